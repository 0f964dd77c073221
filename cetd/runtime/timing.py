"""Timing a piece of work the way a training step sees it: sustained, in windows, the median window.

Torch-free, so that a process that only times messages (`cetd.runtime.transport_profile`) starts without
the model libraries. Why windows and medians: `cetd.runtime.profiling`.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["SUSTAIN_SECONDS", "WARMUP", "WINDOWS", "cpu_seconds", "rounds", "sustained"]

WARMUP = 2
"""Passes left out before timing (caches, the allocator, lazily built kernels)."""

SUSTAIN_SECONDS = 1.0
"""Least wall time each piece is timed for: several periods of a CFS quota (100 ms) or a governor's window."""

WINDOWS = 5
"""Windows each piece's span is cut into; the median window's time per pass is the piece's time."""


def cpu_seconds() -> float:
    """This process's CPU time so far, every thread's (torch's, gRPC's) included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rounds(runs: Mapping[str, Callable[[], None]], repeats: int, sustain: float,
           windows: int = WINDOWS) -> dict[str, list[float]]:
    """Seconds per pass of each of ``runs``, window by window, after warm-up: round after round, one window
    of ``sustain / windows`` seconds of each run, until there were ``windows`` rounds and every run made
    ``repeats`` passes. Returns each run's per-window times, in round order (the same length for all)."""
    for run in runs.values():
        for _ in range(WARMUP):
            run()
    window = sustain / max(windows, 1)
    per_pass: dict[str, list[float]] = {name: [] for name in runs}
    passes = dict.fromkeys(runs, 0)
    done = 0
    while done < windows or min(passes.values(), default=repeats) < repeats:
        for name, run in runs.items():
            count = 0
            started = time.perf_counter()
            while True:
                run()
                count += 1
                elapsed = time.perf_counter() - started
                if elapsed >= window:
                    break
            per_pass[name].append(elapsed / count)
            passes[name] += count
        done += 1
    return per_pass


def sustained(run: Callable[[], None], repeats: int, sustain: float, windows: int = WINDOWS) -> float:
    """Seconds per pass of ``run``: the median over ``windows`` windows of at least ``sustain / windows``
    seconds each (and ``repeats`` passes in all), after warm-up."""
    return statistics.median(rounds({"run": run}, repeats, sustain, windows)["run"])
