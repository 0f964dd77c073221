"""Benchmark: does cetd's planner partition a pipeline well over devices of unequal speed (`bench.planner.run`)."""
