"""Deployment backends: one module per platform behind base.Backend."""
