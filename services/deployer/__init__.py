"""The deployer-worker: turns desired deployments into running instances."""
