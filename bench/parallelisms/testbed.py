"""Four simulated edge devices: namespace hosts on 1000 Mbit links, each daemon in a CPU- and memory-capped cgroup.

A `DeviceSet` names each device's share of a CPU core. `household_on_rig` builds `NetnsRig(4)`, shapes
every host's link with a token bucket (`LINK_MBIT`), and starts one real `cetd run` per host inside
three cgroups: the test rig's `CgroupLimits` (CPU quota, memory limit) and a cpuacct cgroup of this
module, so that every process of the device — daemon, driver, workers — is throttled, capped and
metered together. `Meter` reads those CPU-seconds and each host's link byte counters (on the hub side
of its veth, one `ip -s` call for all four), which is what the bench's own energy model needs.

`cetctl` runs inside the host's namespace but outside its cgroups: it is the user's terminal, not
the device's work.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cetd.daemon.profiler import PROFILE_FILE
from tests.integration.rig import Household, wait_until
from tests.testbed.cgroups import CgroupLimits, cgroup_v1_unavailable_reason
from tests.testbed.netns import NetnsRig, netns_unavailable_reason

LINK_MBIT = 1000
"""Every host's link, both directions: the paper's 1000 Mbps Wi-Fi."""

CPUACCT_ROOT = Path("/sys/fs/cgroup/cpuacct")

CPU_PERIOD_US = 5_000
"""The devices' CFS period: 5 ms slices make a capped host behave like a slower CPU (the kernel's
smallest quota, 1 ms, is 20% of it). With the default 100 ms a host at 20% ran any burst under 20 ms at
full speed, then stopped for 80 ms, and lost the rest of a period's quota whenever it waited on a peer:
the study's predictions then ranged from -56% to +65% on the heterogeneous set (10 ms: -35% to +35%;
5 ms: -31% to +23%, every set)."""

DAEMON_ALLOWANCE_BYTES = 768 * 1024**2
"""Cgroup memory on top of ``device.memory_limit_bytes``: the daemon itself and, on the submitting
device, the driver (which holds the model's weights once); the planner budgets workers only."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSet:
    """How fast each of the four devices is."""

    name: str
    cpu_fractions: tuple[float, ...]
    """Share of one core per device (cgroup CFS quota)."""


HOMOGENEOUS = DeviceSet(name="homogeneous", cpu_fractions=(0.45, 0.45, 0.45, 0.45))
HETEROGENEOUS = DeviceSet(name="heterogeneous", cpu_fractions=(0.8, 0.4, 0.4, 0.2))
"""4 : 2 : 2 : 1, summing to the homogeneous set's 1.8 cores so both fit the machine's two cores."""


def unavailable_reason() -> str | None:
    """Why this machine cannot run the testbed (not root, no namespaces, no cgroup v1), or None."""
    reason = netns_unavailable_reason() or cgroup_v1_unavailable_reason()
    if reason is None and not (CPUACCT_ROOT / "cpuacct.usage").exists():
        reason = f"needs the cgroup v1 cpuacct controller mounted at {CPUACCT_ROOT}"
    return reason


class CpuAccounting:
    """A cpuacct cgroup: the CPU-seconds of every process that ever ran in it (exited ones included)."""

    def __init__(self) -> None:
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if "cpuacct" in line.split(":", 2)[1].split(","))
        self.directory = CPUACCT_ROOT / own.lstrip("/") / f"cetd-bench-{secrets.token_hex(4)}"
        self.directory.mkdir()
        self._finalizer = weakref.finalize(self, _remove_cgroup, self.directory)

    def wrap_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` behind a shell that joins this cgroup first."""
        script = f"echo $$ > '{self.directory}/cgroup.procs'; exec \"$@\""
        return ["/bin/sh", "-c", script, "cetd-cpuacct", *argv]

    def seconds(self) -> float:
        return int((self.directory / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        self._finalizer()


def _remove_cgroup(directory: Path) -> None:
    for _ in range(100):
        if not directory.is_dir():
            return
        for pid in (directory / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (directory.parent / "cgroup.procs").write_text(pid)
        try:
            directory.rmdir()
            return
        except OSError:
            time.sleep(0.05)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """Cumulative counters of every device at one moment."""

    at: float
    """`time.monotonic()` of the reading."""
    cpu_seconds: tuple[float, ...]
    bytes_sent: tuple[int, ...]
    bytes_received: tuple[int, ...]


@dataclass
class Testbed:
    """A running household of four capped devices."""

    rig: NetnsRig
    household: Household
    device_set: DeviceSet
    limits: list[CgroupLimits]
    accounting: list[CpuAccounting]
    memory_limit_bytes: int
    host_of_device: dict[str, int]
    """Device ID → host index."""

    def read(self) -> Reading:
        """CPU-seconds per device and its link's bytes (hub side: what the hub sends is what the host receives)."""
        result = subprocess.run(["ip", "-n", self.rig.hub, "-j", "-s", "link", "show"], capture_output=True,
                                text=True, timeout=30, check=True)
        stats = {entry["ifname"]: entry["stats64"] for entry in json.loads(result.stdout) if "stats64" in entry}
        sent, received = [], []
        for host in self.rig.hosts:
            port = stats.get(host.name, {"rx": {"bytes": 0}, "tx": {"bytes": 0}})
            sent.append(int(port["rx"]["bytes"]))
            received.append(int(port["tx"]["bytes"]))
        return Reading(at=time.monotonic(), cpu_seconds=tuple(a.seconds() for a in self.accounting),
                       bytes_sent=tuple(sent), bytes_received=tuple(received))

    def oom_kills(self) -> int:
        return sum(limit.oom_kills() for limit in self.limits)

    def memory_peaks(self) -> list[int]:
        return [limit.memory_peak_bytes() for limit in self.limits]

    def cetctl(self, device: int, *args: str) -> subprocess.Popen[str]:
        """``cetctl --json ARGS`` against one device, from inside its namespace but outside its cgroups."""
        daemon = self.household.daemons[device]
        import sys

        argv = [*self.rig.exec_argv(device, []), sys.executable, "-m", "cetd.cli.cetctl", "--state-dir",
                str(daemon.state_dir), "--json", *args]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[2], env=dict(os.environ, PYTHONUNBUFFERED="1"))


@contextlib.contextmanager
def testbed(root: Path, device_set: DeviceSet, *, memory_limit_bytes: int) -> Iterator[Testbed]:
    """Build the rig, cap and meter each device, start the household and wait for a coordinator."""
    with contextlib.ExitStack() as stack:
        rig = stack.enter_context(NetnsRig(len(device_set.cpu_fractions)))
        for host in rig.hosts:
            rig.rate_limit(host, LINK_MBIT)
        limits = [stack.enter_context(CgroupLimits(cpu_fraction=fraction, cpu_period_us=CPU_PERIOD_US,
                                                   memory_bytes=memory_limit_bytes + DAEMON_ALLOWANCE_BYTES))
                  for fraction in device_set.cpu_fractions]
        accounting = [CpuAccounting() for _ in rig.hosts]
        for meter in accounting:
            stack.callback(meter.close)
        # Profiling on, as a household runs by default: each device times every model's own shapes inside its
        # cgroup before the model's first plan, so the plan's predictions use each device's real speed.
        extra: dict[str, dict[str, Any]] = {"training": {"worker_threads": 1},
                                            "device": {"memory_limit_bytes": memory_limit_bytes, "profile": True}}
        netns_prefixes = [rig.exec_argv(host, []) for host in rig.hosts]
        # Join the cgroups before entering the namespace: `ip netns exec` remounts /sys, hiding /sys/fs/cgroup.
        capped_prefixes = [limit.wrap_argv(meter.wrap_argv(prefix))
                           for prefix, limit, meter in zip(netns_prefixes, limits, accounting, strict=True)]
        household = Household.create(root, len(rig.hosts), hosts=[h.ip for h in rig.hosts], prefixes=capped_prefixes,
                                     ranks=[len(rig.hosts) - i for i in range(len(rig.hosts))], extra=extra)
        stack.callback(household.close)
        for daemon in household.daemons:
            daemon.start()
        for daemon in household.daemons:
            daemon.wait_ready(timeout=120)  # a daemon on a quarter of a core starts slowly
        for daemon, prefix in zip(household.daemons, netns_prefixes, strict=True):
            daemon.prefix = prefix  # cetctl and peer queries run uncapped: they are the user's, not the device's
        wait_until(household.agreed_coordinator, 60, interval=0.5, what="a coordinator")
        # A fresh daemon times its reference block once, seconds after it starts. Waiting for all four keeps
        # those measurements out of the first model's shape profiles (and the shape profiles out of theirs):
        # on these shared cores, overlapping measurements slowed each other by 10–20%.
        wait_until(lambda: all((Path(d.state_dir) / PROFILE_FILE).exists() for d in household.daemons), 300,
                   interval=0.5, what="every device's reference profile")
        hosts = {str(d.device_id): i for i, d in enumerate(household.daemons)}
        yield Testbed(rig=rig, household=household, device_set=device_set, limits=limits, accounting=accounting,
                      memory_limit_bytes=memory_limit_bytes, host_of_device=hosts)
