"""Slow or small devices on one machine: cgroup v1 CPU quotas and memory limits for test processes.

`CgroupLimits(cpu_fraction=0.25, memory_bytes=4 << 30)` creates ``cetd-test-<id>`` in the cpu and
memory hierarchies (cgroup v1, mounted at /sys/fs/cgroup/{cpu,memory} on these machines), nested
under the cgroup this process already belongs to so that limits the test runner lives under still
apply. Processes enter with `add(pid)`, or start inside with `wrap_argv` (a shell that joins the
cgroup, then execs, so not one instruction runs unlimited). On exit the processes still inside are
moved back to the parent cgroup (they are not killed: their owner stops them) and the cgroups are
removed; a `weakref.finalize` does the same at interpreter exit.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
"""CFS period written with every quota; the quota is this times the CPU fraction."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CpuThrottling:
    """The cpu controller's counters for one cgroup (``cpu.stat``)."""

    periods: int
    """CFS periods in which the cgroup had runnable tasks."""
    throttled_periods: int
    """Periods in which it used up its quota and was stopped."""
    throttled_seconds: float
    """Total time its tasks spent throttled."""


def cgroup_v1_unavailable_reason() -> str | None:
    """Why cgroup v1 cpu and memory limits cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return f"needs root to create cgroups (running as uid {os.geteuid()})"
    for controller, control in (("cpu", "cpu.cfs_quota_us"), ("memory", "memory.limit_in_bytes")):
        if not (CGROUP_ROOT / controller / control).exists():
            return f"needs the cgroup v1 {controller} controller mounted at {CGROUP_ROOT / controller}"
    return None


def _own_cgroup(controller: str) -> Path:
    """The directory of this process's cgroup in one v1 hierarchy."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return CGROUP_ROOT / controller / path.lstrip("/")
    raise RuntimeError(f"this process is in no cgroup v1 {controller} hierarchy")


def _release(directories: list[Path]) -> None:
    """Move remaining processes to the parent cgroup and remove the directories."""
    for directory in directories:
        if not directory.is_dir():
            continue
        for _ in range(50):
            pids = (directory / "cgroup.procs").read_text().split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, OSError):
                    (directory.parent / "cgroup.procs").write_text(pid)
            try:
                directory.rmdir()
                break
            except OSError:  # a process was still leaving, or a new thread group appeared
                time.sleep(0.02)
    directories.clear()


class CgroupLimits:
    """A temporary cgroup with a CPU quota and/or a memory limit; a context manager.

    Args:
        cpu_fraction: share of one core the members may use together, e.g. 0.25; None for no quota.
        memory_bytes: memory (RAM and swap) the members may use together; None for no limit.
        cpu_period_us: the CFS period the quota is spread over. Shorter periods throttle in finer slices,
            closer to a genuinely slower CPU: with 100 ms, a device that waits on a peer loses the rest of
            its quota for that period, and a burst under 20 ms runs at full speed.
    """

    def __init__(self, *, cpu_fraction: float | None = None, memory_bytes: int | None = None,
                 cpu_period_us: int = CPU_PERIOD_US) -> None:
        if cpu_fraction is not None and not 0.01 <= cpu_fraction <= 1024:
            raise ValueError(f"cpu_fraction must be between 0.01 and 1024 cores, not {cpu_fraction}")
        if memory_bytes is not None and memory_bytes < 1 << 20:
            raise ValueError(f"memory_bytes must be at least 1 MiB, not {memory_bytes}")
        if not 1_000 <= cpu_period_us <= 1_000_000:
            raise ValueError(f"cpu_period_us must be between 1 ms and 1 s, not {cpu_period_us}")
        self.cpu_fraction = cpu_fraction
        self.memory_bytes = memory_bytes
        self.cpu_period_us = cpu_period_us
        self.name = f"cetd-test-{secrets.token_hex(4)}"
        self._directories: list[Path] = []
        self._finalizer = weakref.finalize(self, _release, self._directories)

    def __enter__(self) -> CgroupLimits:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Move the members back to the parent cgroup and remove this one; safe to call twice."""
        self._finalizer()

    def _make(self, controller: str) -> Path:
        directory = _own_cgroup(controller) / self.name
        directory.mkdir()
        self._directories.append(directory)
        return directory

    def _create(self) -> None:
        if self.cpu_fraction is not None:
            cpu = self._make("cpu")
            (cpu / "cpu.cfs_period_us").write_text(str(self.cpu_period_us))
            (cpu / "cpu.cfs_quota_us").write_text(str(round(self.cpu_fraction * self.cpu_period_us)))
        if self.memory_bytes is not None:
            memory = self._make("memory")
            (memory / "memory.limit_in_bytes").write_text(str(self.memory_bytes))
            memsw = memory / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # without it, a machine with swap would swap instead of hitting the limit
                memsw.write_text(str(self.memory_bytes))

    @property
    def directories(self) -> tuple[Path, ...]:
        """The cgroup directories created, one per limited controller."""
        return tuple(self._directories)

    def add(self, pid: int) -> None:
        """Move a process (all its threads) into the cgroup."""
        for directory in self._directories:
            (directory / "cgroup.procs").write_text(str(pid))

    def wrap_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` behind a shell that joins the cgroup first, so the program starts already limited."""
        joins = "; ".join(f"echo $$ > '{directory}/cgroup.procs'" for directory in self._directories)
        return ["/bin/sh", "-c", f'{joins}; exec "$@"' if joins else 'exec "$@"', "cetd-cgroup", *argv]

    def pids(self) -> set[int]:
        """Processes currently in the cgroup."""
        return {int(pid) for directory in self._directories for pid in (directory / "cgroup.procs").read_text().split()}

    def cpu_throttling(self) -> CpuThrottling:
        """Counters of the CPU quota; raises ValueError when no quota was set."""
        if self.cpu_fraction is None:
            raise ValueError("this cgroup has no CPU quota")
        fields = dict(
            line.split() for line in (self._directories[0] / "cpu.stat").read_text().splitlines() if line.strip()
        )
        return CpuThrottling(
            periods=int(fields["nr_periods"]),
            throttled_periods=int(fields["nr_throttled"]),
            throttled_seconds=int(fields["throttled_time"]) / 1e9,
        )

    def _memory_directory(self) -> Path:
        if self.memory_bytes is None:
            raise ValueError("this cgroup has no memory limit")
        return self._directories[-1]

    def oom_kills(self) -> int:
        """How many members the kernel killed for exceeding the memory limit (``memory.oom_control``)."""
        control = dict(
            line.split() for line in (self._memory_directory() / "memory.oom_control").read_text().splitlines()
        )
        return int(control["oom_kill"])

    def memory_peak_bytes(self) -> int:
        """The most memory the members used together (``memory.max_usage_in_bytes``)."""
        return int((self._memory_directory() / "memory.max_usage_in_bytes").read_text())
