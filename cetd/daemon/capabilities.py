"""What this device offers: cores, memory, accelerator, and the election rank derived from them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import psutil

from cetd.transport.peer_info import Capabilities


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


def detect_capabilities(*, rank_override: float = 0.0, memory_limit_bytes: int = 0) -> Capabilities:
    """This device's capabilities; a configured memory limit and rank win over what is detected."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory = psutil.virtual_memory().total
    if memory_limit_bytes > 0:
        memory = min(memory, memory_limit_bytes)
    accelerator = detect_accelerator()
    rank = rank_override if rank_override > 0 else auto_rank(cores, memory, accelerator)
    return Capabilities(cores=cores, memory_bytes=memory, accelerator=accelerator, rank=rank, machine=machine_digest())
