"""Benchmarks: reproducible measurements behind the numbers quoted in DESIGN.md and the docs."""
