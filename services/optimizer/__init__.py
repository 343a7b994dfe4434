"""The optimizer: fusion setup and replica targets."""
