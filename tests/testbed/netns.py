"""Separate hosts on one machine: network namespaces joined by a bridge, with scriptable link faults.

`NetnsRig(n)` builds a hub namespace holding a bridge ``br0`` and ``n`` host namespaces, each with
one veth pair: ``eth0`` inside the host (address ``10.77.<k>.<i+1>/24``, a route for 224.0.0.0/4 so
that mDNS multicast works) and ``h<i>`` inside the hub, enslaved to the bridge. Every interface name
lives inside a namespace of its own rig, so names are short and never collide; namespace names carry
a random rig ID (``cetd-<rigid>-h<i>``), and the subnet ``k`` is held with an `fcntl.flock` for the
rig's lifetime so two live rigs never share addresses. Nothing is routed out of the rig: traffic
never leaves these namespaces.

Faults: `link_down`/`link_up` switch a host's hub-side port (the host sees its carrier drop);
`partition` moves each group's ports onto a bridge of its own, so groups are separated at layer 2
while every group still talks internally; `heal` moves them back; `rate_limit` shapes both
directions of a host's link with a token bucket (netem is not in this kernel).

Teardown kills every process started with `popen` (and anything else still running inside the
rig's namespaces), then deletes the namespaces, on normal exit, on exceptions and, through a
`weakref.finalize`, at interpreter exit. A rig whose owner died without tearing down is removed by
the next rig that takes its subnet.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pytest

NETNS_SKIP_REASON = "needs root to create network namespaces"
LOCK_DIR = Path("/run/cetd-testbed") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir()) / "cetd-testbed"
"""Holds one lock file per 10.77.<k>.0/24 subnet in use; the lock is held while the rig lives."""

_STOP_GRACE = timedelta(seconds=3)


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    """One simulated host of a rig."""

    index: int
    """Position in `NetnsRig.hosts`, 0-based."""
    name: str
    """Short name, ``h<index>``; also the name of its port on the hub bridge."""
    netns: str
    """Network namespace name, unique to the rig (``cetd-<rigid>-h<index>``)."""
    ip: str
    """The host's IPv4 address on ``eth0``."""


HostRef = Host | int


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


def _tc(*args: str) -> None:
    result = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} failed: {result.stderr.strip()}")


def _netns_exists(name: str) -> bool:
    return (Path("/run/netns") / name).exists()


@functools.cache
def netns_unavailable_reason() -> str | None:
    """Why this process cannot build a rig, or None when it can (probes with a throwaway namespace)."""
    if os.geteuid() != 0:
        return f"{NETNS_SKIP_REASON} (running as uid {os.geteuid()})"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return f"{NETNS_SKIP_REASON} and iproute2 ('ip', 'tc'), which is not installed"
    probe = f"cetd-probe-{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        return f"{NETNS_SKIP_REASON}; 'ip netns add' failed: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, timeout=30, check=False)
    return None


requires_root = pytest.mark.skipif(
    netns_unavailable_reason() is not None, reason=netns_unavailable_reason() or NETNS_SKIP_REASON
)
"""Skip marker for tests that build a `NetnsRig` (needs root and iproute2)."""


def _stop_processes(processes: Sequence[subprocess.Popen[Any]]) -> None:
    """SIGTERM each live process (its whole group when it leads one), then SIGKILL after a grace period."""

    def signal_process(process: subprocess.Popen[Any], signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(process.pid) == process.pid:
                os.killpg(process.pid, signum)
            else:
                process.send_signal(signum)

    live = [process for process in processes if process.poll() is None]
    for process in live:
        signal_process(process, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE.total_seconds()
    for process in live:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_process(process, signal.SIGKILL)
            process.wait(timeout=10)


def _kill_namespace_pids(netns: str) -> None:
    """SIGKILL whatever still runs inside one of the rig's own namespaces."""
    result = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30, check=False)
    for pid in result.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def _teardown(processes: list[subprocess.Popen[Any]], namespaces: list[str], lock: list[IO[str]]) -> None:
    """Stop processes and delete namespaces (hub last); written to run from `weakref.finalize` as well."""
    _stop_processes(processes)
    for netns in reversed(namespaces):
        if _netns_exists(netns):
            _kill_namespace_pids(netns)
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=30, check=False)
    namespaces.clear()
    for stream in lock:
        stream.close()  # releases the subnet's flock
    lock.clear()


def _remove_stale_rig(rig_id: str) -> None:
    """Delete the namespaces of a rig whose owner died without tearing it down."""
    if not rig_id or not Path("/run/netns").is_dir():
        return
    for entry in sorted(Path("/run/netns").iterdir(), key=lambda path: path.name.endswith("-hub")):
        if entry.name.startswith(f"cetd-{rig_id}-"):
            _kill_namespace_pids(entry.name)
            subprocess.run(["ip", "netns", "delete", entry.name], capture_output=True, timeout=30, check=False)


def _claim_subnet(rig_id: str) -> tuple[int, IO[str]]:
    """Lock a free 10.77.<k>.0/24 for this rig and record the rig ID in the lock file."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    start = secrets.randbelow(256)
    for offset in range(256):
        subnet = (start + offset) % 256
        stream = (LOCK_DIR / f"subnet-{subnet}.lock").open("a+", encoding="ascii")
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.close()
            continue
        stream.seek(0)
        _remove_stale_rig(stream.read().strip())
        stream.seek(0)
        stream.truncate()
        stream.write(rig_id)
        stream.flush()
        return subnet, stream
    raise RuntimeError("all 256 subnets 10.77.0-255.0/24 are held by live rigs")


class NetnsRig:
    """A hub bridge and `n_hosts` host namespaces; a context manager that removes everything on exit."""

    def __init__(self, n_hosts: int) -> None:
        if not 1 <= n_hosts <= 250:
            raise ValueError(f"a rig holds 1 to 250 hosts, not {n_hosts}")
        self.n_hosts = n_hosts
        self.rig_id = secrets.token_hex(3)
        self.hub = f"cetd-{self.rig_id}-hub"
        self.subnet = -1
        self.hosts: list[Host] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._namespaces: list[str] = []
        self._lock: list[IO[str]] = []
        self._partition_bridges: list[str] = []
        self._finalizer = weakref.finalize(self, _teardown, self._processes, self._namespaces, self._lock)

    def __enter__(self) -> NetnsRig:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process started here and delete every namespace; safe to call twice."""
        self._finalizer()

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _add_bridge(self, name: str) -> None:
        # No STP and no forwarding delay: a port forwards as soon as it is up. No IGMP snooping:
        # nobody sends IGMP queries here, and mDNS must reach every port.
        _ip(
            "-n",
            self.hub,
            "link",
            "add",
            name,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        )
        _ip("-n", self.hub, "link", "set", name, "up")

    def _build(self) -> None:
        self.subnet, lock = _claim_subnet(self.rig_id)
        self._lock.append(lock)
        self._add_netns(self.hub)
        self._add_bridge("br0")
        for index in range(self.n_hosts):
            host = Host(
                index=index,
                name=f"h{index}",
                netns=f"cetd-{self.rig_id}-h{index}",
                ip=f"10.77.{self.subnet}.{index + 1}",
            )
            self._add_netns(host.netns)  # teardown deletes in reverse order: hosts first, the hub last
            _ip(
                "-n",
                host.netns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                host.name,
                "netns",
                self.hub,
            )
            _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "route", "add", "224.0.0.0/4", "dev", "eth0")
            _ip("-n", self.hub, "link", "set", host.name, "master", "br0")
            _ip("-n", self.hub, "link", "set", host.name, "up")
            self.hosts.append(host)

    def host(self, ref: HostRef) -> Host:
        """The `Host` for an index or a `Host` of this rig."""
        host = self.hosts[ref] if isinstance(ref, int) else ref
        if host not in self.hosts:
            raise ValueError(f"{host.netns} is not a host of rig {self.rig_id}")
        return host

    def exec_argv(self, ref: HostRef, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed so that it runs inside the host's namespace."""
        return ["ip", "netns", "exec", self.host(ref).netns, *argv]

    def machine_argv(self, ref: HostRef, directory: Path) -> list[str]:
        """A prefix that runs a command inside the host's namespace as if on a machine of its own: in a mount
        namespace where the kernel's boot ID (which cetd tells machines apart by) is one of the host's own,
        kept in ``directory``. CPUs and memory are still shared: it changes what daemons believe only."""
        host = self.host(ref)
        boot_id = directory / f"{host.netns}.boot_id"
        boot_id.write_text(f"{secrets.token_hex(4)}-{host.index:04x}-4000-8000-{secrets.token_hex(6)}\n")
        return [*self.exec_argv(ref, []), "unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /proc/sys/kernel/random/boot_id && exec "$@"', str(boot_id)]

    def popen(self, ref: HostRef, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` on a host; it runs in a session of its own and is stopped at teardown.

        Keyword arguments go to `subprocess.Popen`.
        """
        kwargs.setdefault("start_new_session", True)
        process: subprocess.Popen[Any] = subprocess.Popen(self.exec_argv(ref, argv), **kwargs)
        self._processes.append(process)
        return process

    def run(
        self, ref: HostRef, argv: Sequence[str], *, timeout: timedelta = timedelta(seconds=30)
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` on a host to completion and capture its output as text (no exit-code check)."""
        return subprocess.run(
            self.exec_argv(ref, argv),
            capture_output=True,
            text=True,
            timeout=timeout.total_seconds(),
            check=False,
        )

    def stop(self, process: subprocess.Popen[Any]) -> int:
        """Stop one process started with `popen` (SIGTERM, then SIGKILL) and return its exit status."""
        _stop_processes([process])
        return process.wait()

    def link_down(self, ref: HostRef) -> None:
        """Cut a host off: its hub-side port goes down and the host loses carrier on ``eth0``."""
        _ip("-n", self.hub, "link", "set", self.host(ref).name, "down")

    def link_up(self, ref: HostRef) -> None:
        """Reconnect a host cut off by `link_down`."""
        _ip("-n", self.hub, "link", "set", self.host(ref).name, "up")

    def rate_limit(self, ref: HostRef, mbit: float) -> None:
        """Shape both directions of a host's link to `mbit` megabits per second (token bucket)."""
        if mbit <= 0:
            raise ValueError(f"rate must be positive, not {mbit} Mbit/s")
        host = self.host(ref)
        shape = ["root", "tbf", "rate", f"{mbit}mbit", "burst", "256kb", "latency", "50ms"]
        _tc("-n", host.netns, "qdisc", "replace", "dev", "eth0", *shape)
        _tc("-n", self.hub, "qdisc", "replace", "dev", host.name, *shape)

    def clear_rate_limit(self, ref: HostRef) -> None:
        """Remove the shaping set by `rate_limit` (a no-op when there is none)."""
        host = self.host(ref)
        for netns, device in ((host.netns, "eth0"), (self.hub, host.name)):
            subprocess.run(
                ["tc", "-n", netns, "qdisc", "del", "dev", device, "root"],
                capture_output=True,
                timeout=30,
                check=False,
            )

    def partition(self, groups: Sequence[Sequence[HostRef]]) -> None:
        """Split the network: each group gets a bridge of its own and hears nothing from the others.

        Hosts named in no group stay together on the main bridge. Calling it again first heals.
        """
        members = [self.host(ref) for group in groups for ref in group]
        if len({host.index for host in members}) != len(members):
            raise ValueError("partition groups must not share hosts")
        self.heal()
        for number, group in enumerate(groups, start=1):
            bridge = f"br{number}"
            self._add_bridge(bridge)
            self._partition_bridges.append(bridge)
            for ref in group:
                _ip("-n", self.hub, "link", "set", self.host(ref).name, "master", bridge)

    def heal(self) -> None:
        """Undo `partition`: every host back on the main bridge."""
        if not self._partition_bridges:
            return
        for host in self.hosts:
            _ip("-n", self.hub, "link", "set", host.name, "master", "br0")
        for bridge in self._partition_bridges:
            _ip("-n", self.hub, "link", "delete", bridge)
        self._partition_bridges.clear()
