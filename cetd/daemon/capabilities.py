"""What this device offers: cores, memory, accelerator, and the election rank derived from them."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import psutil

from cetd.transport.peer_info import Capabilities

logger = logging.getLogger(__name__)


def detect_accelerator() -> str:
    """A short accelerator description without importing torch (the daemon stays torch-free).

    Looks for NVIDIA devices (desktop GPUs and Jetson boards) through their device files.
    """
    if os.path.exists("/dev/nvidia0"):
        return "cuda"
    if os.path.exists("/dev/nvhost-ctrl-gpu") or os.path.exists("/etc/nv_tegra_release"):
        return "cuda:jetson"
    return ""


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
"""A random ID the kernel draws at boot: shared by every container and network namespace on that kernel."""


def machine_digest(boot_id: Path = BOOT_ID) -> str:
    """An opaque digest of the running kernel's boot ID; "" where there is none (not Linux).

    Daemons with the same digest share one machine's CPUs and memory, so timing their speed at the same
    moment would measure each other (the coordinator profiles them one at a time). The boot ID itself
    is not sent: it names this boot of this machine and need not leave it.
    """
    try:
        text = boot_id.read_text().strip()
    except OSError:
        return ""
    return hashlib.sha256(b"cetd machine\0" + text.encode()).hexdigest()[:16] if text else ""


def auto_rank(cores: int, memory_bytes: int, accelerator: str) -> float:
    """Election rank: prefer devices that will stay responsive while coordinating a job.

    Cores count most, then memory (GiB / 4), then an accelerator bonus; the exact scale only matters for
    ordering, and ties are broken by device ID.
    """
    return float(cores) + memory_bytes / (4 * 1024**3) + (8.0 if accelerator else 0.0)


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
UNLIMITED = 1 << 60
"""Limits at or above this are "no limit" (cgroup v1 writes one as 2⁶³ rounded down to a page)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CgroupMemory:
    """The memory limit this process lives under: its cgroup's and every enclosing cgroup's (a systemd
    ``MemoryMax=``, a slice's, a container's)."""

    limit_bytes: int
    """The tightest limit on the way to the root."""
    headroom_bytes: int
    """The least, over the limited levels, of limit − use, where use leaves out the page cache (the
    kernel reclaims it before it refuses memory)."""


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _stat_sum(path: Path, keys: tuple[str, ...]) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    fields = dict(line.split(maxsplit=1) for line in lines if " " in line)
    return sum(int(fields[key]) for key in keys if key in fields and fields[key].strip().isdigit())


# (limit file, usage file, memory.stat keys of the page cache), cgroup v2 then v1.
_V2 = ("memory.max", "memory.current", ("file",))
_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", ("total_active_file", "total_inactive_file"))


def _memory_directory(proc_cgroup: str, root: Path) -> tuple[Path, Path, tuple[str, str, tuple[str, ...]]] | None:
    """This process's memory cgroup directory, the hierarchy's root directory, and its file names."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        relative = path.strip().lstrip("/")
        if "memory" in controllers.split(","):
            return root / "memory" / relative, root / "memory", _V1
        if controllers == "":
            for mount in (root, root / "unified"):
                if (mount / relative / _V2[0]).exists() or (mount / "cgroup.controllers").exists():
                    return mount / relative, mount, _V2
    return None


def cgroup_memory(proc_cgroup: str | None = None, root: Path = CGROUP_ROOT) -> CgroupMemory | None:
    """The memory limit on this process from its cgroups (v1 or v2), or None where nothing limits it.

    ``proc_cgroup`` is the text of ``/proc/self/cgroup`` (read when None); ``root`` is where the cgroup
    file systems are mounted.
    """
    if proc_cgroup is None:
        try:
            proc_cgroup = PROC_SELF_CGROUP.read_text()
        except OSError:
            return None
    found = _memory_directory(proc_cgroup, root)
    if found is None:
        return None
    directory, top, (limit_file, usage_file, cache_keys) = found
    limit, headroom = UNLIMITED, UNLIMITED
    while True:
        level_limit = _read_int(directory / limit_file)
        if level_limit is not None and level_limit < UNLIMITED:
            used = (_read_int(directory / usage_file) or 0) - _stat_sum(directory / "memory.stat", cache_keys)
            limit, headroom = min(limit, level_limit), min(headroom, max(level_limit - max(used, 0), 0))
        if directory == top or top not in directory.parents:
            break
        directory = directory.parent
    return None if limit >= UNLIMITED else CgroupMemory(limit_bytes=limit, headroom_bytes=headroom)


def memory_ceiling(memory_limit_bytes: int = 0) -> int:
    """The most memory this device can ever offer: physical memory, the cgroup's limit and the configured
    ``[device] memory_limit_bytes`` (0: none), whichever is least."""
    memory = psutil.virtual_memory().total
    limited = cgroup_memory()
    if limited is not None:
        memory = min(memory, limited.limit_bytes)
    if memory_limit_bytes > 0:
        memory = min(memory, memory_limit_bytes)
    return memory


def job_processes_bytes() -> int:
    """Private memory (resident, not file-backed or shared) of this process's children: the job processes
    (workers, a driver, profilers) that a new plan replaces."""
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            info = child.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += max(info.rss - getattr(info, "shared", 0), 0)
    return total


def free_memory(ceiling: int) -> int:
    """Memory a new worker could use now, at most ``ceiling`` (`memory_ceiling`).

    What the kernel calls available (free memory and reclaimable cache), or the cgroup's headroom where
    that is less, plus what this daemon's own job processes hold: they are the training a new plan
    replaces, so the memory they hold is the job's to reuse.
    """
    free = psutil.virtual_memory().available
    limited = cgroup_memory()
    if limited is not None:
        free = min(free, limited.headroom_bytes)
    return max(min(free + job_processes_bytes(), ceiling), 0)


FREE_MEMORY_EVERY = timedelta(seconds=5)
FREE_MEMORY_STEP = 16 * 2**20
"""`keep_free_memory` republishes only changes at least this large: heartbeats need not carry noise."""


async def keep_free_memory(capabilities: Callable[[], Capabilities], publish: Callable[[Capabilities], None],
                           every: timedelta = FREE_MEMORY_EVERY) -> None:
    """Background task: measure `free_memory` every ``every`` and publish it when it moved, so the next plan
    (a re-plan after a failure included) sees what the device has now, not what it had at start."""
    while True:
        await asyncio.sleep(every.total_seconds())
        current = capabilities()
        try:
            free = await asyncio.to_thread(free_memory, current.memory_bytes)
        except (OSError, psutil.Error) as error:
            logger.warning("could not measure free memory: %s", error)
            continue
        if abs(free - current.free_memory_bytes) >= FREE_MEMORY_STEP:
            publish(replace(capabilities(), free_memory_bytes=free))


def detect_capabilities(*, rank_override: float = 0.0, memory_limit_bytes: int = 0) -> Capabilities:
    """This device's capabilities; a configured memory limit and rank win over what is detected.

    ``memory_bytes`` is the device's ceiling (`memory_ceiling`), ``free_memory_bytes`` what is free now.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory = memory_ceiling(memory_limit_bytes)
    accelerator = detect_accelerator()
    rank = rank_override if rank_override > 0 else auto_rank(cores, memory, accelerator)
    return Capabilities(cores=cores, memory_bytes=memory, accelerator=accelerator, rank=rank, machine=machine_digest(),
                        free_memory_bytes=free_memory(memory))
