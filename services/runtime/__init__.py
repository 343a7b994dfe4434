"""The instance program: runs one fusion group's handlers."""
