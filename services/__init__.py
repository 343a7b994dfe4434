"""The nuclide services: gateway, store, deployer, optimizer, runtime and the CLI."""
