"""Reproduce the paper's parallelism study on four simulated edge devices: ``python -m bench.parallelisms.run``."""
