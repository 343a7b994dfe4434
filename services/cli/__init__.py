"""The nuclide command-line interface."""
