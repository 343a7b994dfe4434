"""Scenarios whose features are other issues': reported as pending rows, with their targets.

Nothing is pending now: async throughput, the fusion chain and scale to zero
became real scenarios (``async_throughput.py``, ``fusion_chain.py``, the
``scale_to_zero`` scenario in ``density.py``). A new one is registered here with
``registry.pending(name, title, "issue N: feature", rows)`` until its feature lands.
"""
