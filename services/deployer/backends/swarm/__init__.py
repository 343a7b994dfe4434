"""The swarm backend: each function group is a Docker Swarm service (see backend.py)."""
