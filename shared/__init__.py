"""Code shared by every nuclide service: protocol, errors, config, logging, validation."""
