"""nuclide's version: the installed package's, so the CLI and the gateway report the one in pyproject.toml."""

from __future__ import annotations

import importlib.metadata

try:
    VERSION = importlib.metadata.version("nuclide")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0.0.0+unknown"
