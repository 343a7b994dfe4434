"""The mapper-store: the only writer of nuclide state."""
