"""The docker backend: containers through the Docker Engine API (``backend.py`` maps its modules)."""
