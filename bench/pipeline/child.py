"""What every benchmark process does first: pin itself, limit torch, and talk to the orchestrator.

The orchestrator (`bench.pipeline.run`) starts each contender as a fresh ``python -m`` process (never a
fork) and talks to it with one JSON object per line: the launch message on stdin, events on stdout.
Logs go to stderr, which the orchestrator keeps in a file and shows when a process fails.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.pipeline.schedstat import ThreadTimes, main_thread_times, process_times

__all__ = ["emit", "mark", "pin", "read_message", "start", "step_report"]


def pin(core: int | None) -> None:
    """Run this process (and every thread it starts from now on) on ``core``; None leaves it free.

    Called before torch or grpc start their threads: threads inherit the affinity of their creator.
    """
    if core is not None:
        os.sched_setaffinity(0, {core})


def emit(event: str, **fields: Any) -> None:
    """Send one event to the orchestrator."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def read_message() -> dict[str, Any]:
    """The next message from the orchestrator; exit quietly when it went away."""
    line = sys.stdin.readline()
    if not line:
        raise SystemExit(0)
    message: dict[str, Any] = json.loads(line)
    return message


def start(name: str) -> dict[str, Any]:
    """Read the launch message, pin to its ``core`` and set torch to its ``threads`` (default 1)."""
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s"
    )
    launch = read_message()
    pin(launch.get("core"))
    import torch

    torch.set_num_threads(int(launch.get("threads", 1)))
    return launch


def step_report(marks: Sequence[tuple[float, ThreadTimes, ThreadTimes]]) -> dict[str, list[float]]:
    """Per step, from the marks taken at its start and end: wall seconds, the main thread's CPU seconds and
    run-queue wait, and the CPU seconds of the whole process (every thread)."""
    pairs = list(itertools.pairwise(marks))
    return {
        "seconds": [end[0] - begin[0] for begin, end in pairs],
        "cpu_seconds": [end[1].cpu - begin[1].cpu for begin, end in pairs],
        "wait_seconds": [end[1].wait - begin[1].wait for begin, end in pairs],
        "process_cpu_seconds": [end[2].cpu - begin[2].cpu for begin, end in pairs],
    }


def mark() -> tuple[float, ThreadTimes, ThreadTimes]:
    """Wall time, the main thread's and the whole process's times, for `step_report`."""
    return time.perf_counter(), main_thread_times(), process_times()
