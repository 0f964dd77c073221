"""Tests for the test rig itself: namespace hosts really talk, really fail, and cgroups really limit.

Traffic is plain Python TCP and UDP between the rig's own namespaces (no `ping` on these machines);
nothing is routed outside them.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from .cgroups import CgroupLimits, cgroup_v1_unavailable_reason
from .netns import Host, NetnsRig, requires_root

pytestmark = [pytest.mark.netns, requires_root]

ECHO_PORT = 7000

# Answers each connection with the number of bytes it received before the peer shut down writing.
COUNTING_SERVER = """
import socket, sys, threading
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
def serve(connection):
    with connection:
        total = 0
        while chunk := connection.recv(1 << 20):
            total += len(chunk)
        connection.sendall(str(total).encode())
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"""

# argv[1]: JSON {"targets": [[ip, port], ...], "nbytes": N, "timeout_s": T, "retry_for_s": R}.
# Prints one JSON result per target: whether the server echoed the count, and the seconds it took.
CLIENT = """
import json, socket, sys, time
request = json.loads(sys.argv[1])
results = []
for ip, port in request["targets"]:
    give_up = time.monotonic() + request["retry_for_s"]
    while True:
        start = time.monotonic()
        try:
            with socket.create_connection((ip, port), timeout=request["timeout_s"]) as connection:
                connection.settimeout(30)
                connection.sendall(b"x" * request["nbytes"])
                connection.shutdown(socket.SHUT_WR)
                reply = connection.recv(64)
            results.append({"ok": int(reply) == request["nbytes"], "seconds": time.monotonic() - start})
            break
        except OSError as error:
            if time.monotonic() >= give_up:
                results.append({"ok": False, "error": repr(error)})
                break
            time.sleep(0.1)
print(json.dumps(results))
"""

MULTICAST_GROUP = "239.77.0.1"

MULTICAST_RECEIVER = """
import socket, struct, sys
receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
receiver.bind(("", 7001))
receiver.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                    struct.pack("4s4s", socket.inet_aton(sys.argv[1]), socket.inet_aton(sys.argv[2])))
print("ready", flush=True)
receiver.settimeout(10)
print(receiver.recvfrom(100)[0].decode(), flush=True)
"""

MULTICAST_SENDER = """
import socket, sys, time
sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
for _ in range(100):
    sender.sendto(b"hello from " + sys.argv[2].encode(), (sys.argv[1], 7001))
    time.sleep(0.05)
"""


def start_ready(rig: NetnsRig, host: Host, script: str, *args: str) -> subprocess.Popen[str]:
    process = rig.popen(host, [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


def send(
    rig: NetnsRig, source: Host, targets: Sequence[Host], *, nbytes: int = 16, retry_for_s: float = 0.0
) -> list[dict[str, Any]]:
    """Send `nbytes` from `source` to each target's counting server; one result per target."""
    request = {
        "targets": [[target.ip, ECHO_PORT] for target in targets],
        "nbytes": nbytes,
        "timeout_s": 1.0,
        "retry_for_s": retry_for_s,
    }
    result = rig.run(source, [sys.executable, "-c", CLIENT, json.dumps(request)], timeout=timedelta(seconds=60))
    assert result.returncode == 0, result.stderr
    results: list[dict[str, Any]] = json.loads(result.stdout)
    return results


def reachable(rig: NetnsRig, source: Host, target: Host, *, expect: bool) -> bool:
    """One probe when cut off is expected, retries for 5 s when reachability is expected."""
    return bool(send(rig, source, [target], retry_for_s=5.0 if expect else 0.0)[0]["ok"])


def rig_namespaces(rig_id: str) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=30)
    return [line.split()[0] for line in listing.stdout.splitlines() if f"cetd-{rig_id}-" in line]


@pytest.fixture
def rig() -> Iterator[NetnsRig]:
    """Three hosts, each running a counting TCP server on port 7000."""
    with NetnsRig(3) as built:
        for host in built.hosts:
            start_ready(built, host, COUNTING_SERVER, host.ip, str(ECHO_PORT))
        yield built


@pytest.mark.timeout(60)
def test_hosts_have_their_own_addresses_and_reach_each_other(rig: NetnsRig) -> None:
    assert [host.ip for host in rig.hosts] == [f"10.77.{rig.subnet}.{index}" for index in (1, 2, 3)]
    assert len({host.netns for host in rig.hosts} | {rig.hub}) == 4
    assert all(len(host.netns) <= 15 for host in rig.hosts)
    for source in rig.hosts:
        others = [host for host in rig.hosts if host != source]
        assert [result["ok"] for result in send(rig, source, others, retry_for_s=5.0)] == [True, True]
    # The host really is a separate stack: its own loopback and eth0, and no route to the outside.
    routes = rig.run(rig.hosts[0], ["ip", "route", "show"]).stdout
    assert "default" not in routes
    assert f"10.77.{rig.subnet}.0/24 dev eth0" in routes


@pytest.mark.timeout(60)
def test_multicast_route_and_delivery(rig: NetnsRig) -> None:
    for host in rig.hosts:
        assert "224.0.0.0/4 dev eth0" in rig.run(host, ["ip", "route", "show", "224.0.0.0/4"]).stdout
    receivers = [start_ready(rig, host, MULTICAST_RECEIVER, MULTICAST_GROUP, host.ip) for host in rig.hosts[1:]]
    rig.popen(rig.hosts[0], [sys.executable, "-c", MULTICAST_SENDER, MULTICAST_GROUP, rig.hosts[0].name])
    for receiver in receivers:
        output, _ = receiver.communicate(timeout=15)
        assert output.strip() == "hello from h0"


@pytest.mark.timeout(60)
def test_link_down_cuts_one_host_off_and_link_up_restores_it(rig: NetnsRig) -> None:
    h0, h1, h2 = rig.hosts
    assert reachable(rig, h0, h1, expect=True)
    rig.link_down(h1)
    assert "NO-CARRIER" in rig.run(h1, ["ip", "link", "show", "eth0"]).stdout
    assert not reachable(rig, h0, h1, expect=False)
    assert not reachable(rig, h1, h2, expect=False)
    assert reachable(rig, h0, h2, expect=True)
    rig.link_up(1)
    assert reachable(rig, h0, h1, expect=True)
    assert reachable(rig, h1, h2, expect=True)


@pytest.mark.timeout(60)
def test_partition_separates_groups_and_heal_joins_them(rig: NetnsRig) -> None:
    h0, h1, h2 = rig.hosts
    rig.partition([[0, 1], [2]])
    assert reachable(rig, h0, h1, expect=True)
    assert reachable(rig, h1, h0, expect=True)
    for source, target in ((h0, h2), (h1, h2), (h2, h0), (h2, h1)):
        assert not reachable(rig, source, target, expect=False), f"{source.name} reached {target.name}"
    rig.heal()
    for source, target in ((h0, h2), (h2, h1), (h0, h1)):
        assert reachable(rig, source, target, expect=True), f"{source.name} cannot reach {target.name}"
    with pytest.raises(ValueError, match="must not share hosts"):
        rig.partition([[0, 1], [1, 2]])


@pytest.mark.timeout(90)
def test_rate_limit_slows_both_directions(rig: NetnsRig) -> None:
    h0, h1, _ = rig.hosts
    nbytes = 5_000_000
    (unlimited,) = send(rig, h0, [h1], nbytes=nbytes, retry_for_s=5.0)
    rig.rate_limit(h0, 100)
    (outgoing,) = send(rig, h0, [h1], nbytes=nbytes)
    (incoming,) = send(rig, h1, [h0], nbytes=nbytes)
    assert unlimited["ok"]
    assert outgoing["ok"]
    assert incoming["ok"]
    # 5 MB at 100 Mbit/s is 0.4 s on the wire (less the 256 kB burst); unshaped veth is far faster.
    assert outgoing["seconds"] >= 0.3, outgoing
    assert incoming["seconds"] >= 0.3, incoming
    assert unlimited["seconds"] < outgoing["seconds"]
    assert outgoing["seconds"] < 10
    rig.clear_rate_limit(h0)
    assert "tbf" not in rig.run(h0, ["tc", "qdisc", "show", "dev", "eth0"]).stdout


@pytest.mark.timeout(60)
def test_teardown_removes_namespaces_and_processes_even_on_error() -> None:
    started: list[subprocess.Popen[Any]] = []
    rig_ids: list[str] = []

    def build_then_fail() -> None:
        with NetnsRig(2) as failing:
            rig_ids.append(failing.rig_id)
            started.append(failing.popen(0, ["sleep", "600"]))
            # A process not started through popen, but inside the rig, is reaped too.
            started.append(subprocess.Popen(failing.exec_argv(1, ["sleep", "600"])))
            assert len(rig_namespaces(failing.rig_id)) == 3
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_then_fail()
    (rig_id,) = rig_ids
    assert rig_namespaces(rig_id) == []
    for process in started:
        assert process.wait(timeout=10) != 0

    with NetnsRig(1) as rig:
        rig_id = rig.rig_id
        sleeper = rig.popen(0, ["sleep", "600"])
        assert rig.stop(sleeper) != 0
    rig.close()  # a second close is harmless
    assert rig_namespaces(rig_id) == []


# Builds a one-host rig and dies without tearing it down (os._exit skips finalizers).
ABANDON_RIG = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from tests.testbed.netns import NetnsRig
rig = NetnsRig(1).__enter__()
print(json.dumps([rig.rig_id, rig.subnet]), flush=True)
os._exit(0)
"""


@pytest.mark.timeout(60)
def test_a_rig_abandoned_by_a_dead_owner_is_removed_by_the_next_rig(monkeypatch: pytest.MonkeyPatch) -> None:
    repo_root = str(Path(__file__).resolve().parents[2])
    output = subprocess.run(
        [sys.executable, "-c", ABANDON_RIG, repo_root], capture_output=True, text=True, timeout=30, check=True
    )
    dead_rig_id, subnet = json.loads(output.stdout)
    assert len(rig_namespaces(dead_rig_id)) == 2
    monkeypatch.setattr(secrets, "randbelow", lambda _: subnet)  # claim the dead rig's subnet
    with NetnsRig(1) as rig:
        assert rig.subnet == subnet
        assert rig_namespaces(dead_rig_id) == []


needs_cgroup_v1 = pytest.mark.skipif(
    cgroup_v1_unavailable_reason() is not None, reason=cgroup_v1_unavailable_reason() or ""
)

# Spins for argv[1] seconds of wall time and prints the CPU seconds it got.
BUSY_LOOP = """
import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
print(time.process_time())
"""


@pytest.mark.timeout(60)
@needs_cgroup_v1
def test_cgroup_cpu_quota_slows_a_busy_loop() -> None:
    wall_s = 1.5
    with CgroupLimits(cpu_fraction=0.25) as limits:
        directories = limits.directories
        result = subprocess.run(
            limits.wrap_argv([sys.executable, "-c", BUSY_LOOP, str(wall_s)]),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        throttling = limits.cpu_throttling()
    cpu_s = float(result.stdout)
    # A quarter of a core for 1.5 s is 0.375 CPU-seconds, plus interpreter start-up before the loop.
    assert cpu_s <= 0.25 * wall_s + 0.15, cpu_s
    assert throttling.throttled_periods >= 5
    assert throttling.throttled_seconds > 0.2
    assert not any(directory.exists() for directory in directories)


@pytest.mark.timeout(60)
@needs_cgroup_v1
def test_cgroup_memory_limit_stops_a_large_allocation() -> None:
    allocate = "import sys; block = b'x' * (int(sys.argv[1]) << 20); print(len(block))"
    with CgroupLimits(memory_bytes=64 << 20) as limits:
        small = subprocess.run(
            limits.wrap_argv([sys.executable, "-c", allocate, "8"]),
            capture_output=True,
            text=True,
            timeout=30,
        )
        large = subprocess.run(
            limits.wrap_argv([sys.executable, "-c", allocate, "256"]),
            capture_output=True,
            text=True,
            timeout=30,
        )
        oom_kills = limits.oom_kills()
        peak_bytes = limits.memory_peak_bytes()
        directories = limits.directories
    assert small.returncode == 0
    assert int(small.stdout) == 8 << 20
    assert large.returncode == -9, large  # SIGKILL from the OOM killer
    assert oom_kills == 1
    assert 8 << 20 < peak_bytes <= 64 << 20
    assert not any(Path(directory).exists() for directory in directories)


@pytest.mark.timeout(30)
@needs_cgroup_v1
def test_cgroup_add_moves_a_running_process_and_release_moves_it_back() -> None:
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        with CgroupLimits(cpu_fraction=0.5) as limits:
            limits.add(sleeper.pid)
            assert limits.pids() == {sleeper.pid}
            directory = limits.directories[0]
        assert not directory.exists()
        assert sleeper.poll() is None  # released, not killed
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
