"""nuclide's benchmarks (issue 6): ``python -m tests.bench``; kept import-light, the baseline apps live here too."""
