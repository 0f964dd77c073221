"""How much CPU this process got, and how long its threads waited for a CPU, from Linux's schedstat.

``/proc/self/task/<tid>/schedstat`` holds, per thread, nanoseconds on a CPU and nanoseconds runnable
but waiting in a run queue. On a shared machine the second is the cost of other people's load: a
pinned worker that waited 30% of a step for its core ran 30% slower for reasons outside the code
under test. The benchmark reports it next to every timing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ThreadTimes", "main_thread_times", "process_times", "thread_times"]


@dataclass(frozen=True, slots=True)
class ThreadTimes:
    """Seconds on a CPU and seconds runnable but waiting for one."""

    cpu: float
    wait: float

    def __sub__(self, other: ThreadTimes) -> ThreadTimes:
        return ThreadTimes(self.cpu - other.cpu, self.wait - other.wait)


def thread_times() -> dict[str, ThreadTimes]:
    """Every live thread of this process, by ``name/tid``."""
    out: dict[str, ThreadTimes] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat", encoding="ascii") as stat:
                run_ns, wait_ns, _ = stat.read().split()
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as comm:
                name = comm.read().strip()
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        out[f"{name}/{tid}"] = ThreadTimes(int(run_ns) / 1e9, int(wait_ns) / 1e9)
    return out


def process_times() -> ThreadTimes:
    """The sums over this process's live threads."""
    times = thread_times().values()
    return ThreadTimes(sum(t.cpu for t in times), sum(t.wait for t in times))


def main_thread_times() -> ThreadTimes:
    """The main thread's times (the one that runs torch compute in every benchmark process)."""
    with open(f"/proc/self/task/{os.getpid()}/schedstat", encoding="ascii") as stat:
        run_ns, wait_ns, _ = stat.read().split()
    return ThreadTimes(int(run_ns) / 1e9, int(wait_ns) / 1e9)
