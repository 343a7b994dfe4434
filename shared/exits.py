"""Exit codes an instance program reports to the deployer, which tells its user what they mean."""

EXIT_INIT_FAILED = 3  # the function could not load (import error, init_context raised, a warm container not up)
