"""A ring all-reduce, and the same tensor exchanged whole, on the study's testbed, against the cost model.

    sudo .venv/bin/python -m bench.collectives.run [--numel 24576] [--repeats 100] [--output PATH]

The study (`bench.parallelisms`) found the heterogeneous set's data- and tensor-parallel jobs slower
than forecast. Both are built on `cetd.runtime.collectives.all_reduce_`, so this bench times that one
collective alone, on the same four namespace hosts (1000 Mbit links, CFS quotas in 5 ms slices: the
homogeneous and the heterogeneous set), with a process per host (`bench.collectives.member`) over
mutual-TLS `GrpcPeerChannel`s. NUMEL float32 defaults to the study's tensor-parallel activation
(8 samples × 32 tokens × 96). Per device set it prints and writes to JSON:

- the measured all-reduce, and the cost model's forecast (`ring_all_reduce_seconds` paced by the
  slowest device's own transport profile; wire latency 0 here, where the daemon adds its link probe),
  from each device's profile against an echo in a second process of its own, and from the profile the
  daemon takes where another device echoes (against the fastest other host, this end's CPU);
- each member's CPU per ring round, measured in the 4-host ring and in a 2-member ring inside one
  device (what a device could time on its own), and the profile's hop;
- a compute burst followed by the all-reduce, against the sum of the two timed alone;
- the same all-reduce with the tensor exchanged whole, timed in the same run, against its forecast
  (`direct_all_reduce_seconds`), and the size from which the planner would send it round the ring
  (`ring_min_bytes`) for these devices.

Needs root, network namespaces and cgroup v1; otherwise it says why and exits 0. About 3 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rich.console import Console
from rich.table import Table

from bench.parallelisms.testbed import (
    CPU_PERIOD_US,
    HETEROGENEOUS,
    HOMOGENEOUS,
    LINK_MBIT,
    DeviceSet,
    unavailable_reason,
)
from cetd.cluster.transport_costs import (
    Messaging,
    direct_all_reduce_seconds,
    ring_all_reduce_seconds,
    ring_min_bytes,
)
from tests.testbed.cgroups import CgroupLimits
from tests.testbed.netns import NetnsRig
from tests.transport.conftest import make_household

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "collectives.json"


def measure(device_set: DeviceSet, numel: int, repeats: int) -> list[dict[str, float]]:
    """Every member's result file, from one run on a fresh rig."""
    fractions = device_set.cpu_fractions
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cetd-collectives-")))
        rig = stack.enter_context(NetnsRig(len(fractions)))
        (workdir / "tls.pkl").write_bytes(pickle.dumps(make_household([f"d{i}" for i in range(len(fractions))])))
        for host in rig.hosts:
            rig.rate_limit(host, LINK_MBIT)
        limits = [stack.enter_context(CgroupLimits(cpu_fraction=f, cpu_period_us=CPU_PERIOD_US)) for f in fractions]
        echoes = ",".join(str(echo_host(fractions, i)) for i in range(len(fractions)))
        # Join the cgroup before entering the namespace (`ip netns exec` remounts /sys).
        members = [subprocess.Popen(limit.wrap_argv(rig.exec_argv(i, [
            sys.executable, "-m", "bench.collectives.member", str(i), host.ip, str(workdir), str(numel),
            str(repeats), echoes])), cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
            for i, (host, limit) in enumerate(zip(rig.hosts, limits, strict=True))]
        for member in members:
            member.wait(timeout=600)
        missing = [i for i in range(len(fractions)) if not (workdir / f"result{i}.json").exists()]
        if missing:
            raise SystemExit(f"members {missing} of the {device_set.name} set wrote no result")
        return [json.loads((workdir / f"result{i}.json").read_text()) for i in range(len(fractions))]


def echo_host(fractions: tuple[float, ...], host: int) -> int:
    """The host that echoes ``host``'s cross-host profile: the fastest other one, the first of equals (as
    `cetd.daemon.shape_profiles.echo_order` orders the testbed's devices, which share one machine)."""
    return min((h for h in range(len(fractions)) if h != host), key=lambda h: (-fractions[h], h))


def summarise(device_set: DeviceSet, members: list[dict[str, float]], numel: int) -> dict[str, Any]:
    size, n = numel * 4, len(members)
    rounds = 2 * (n - 1)
    profiles = [Messaging(m["message_seconds"], m["byte_seconds"]) for m in members]
    slowest_cpu, bandwidth = Messaging.slowest(profiles), LINK_MBIT * 1e6 / 8
    forecast = ring_all_reduce_seconds(size, n, bandwidth, 0.0, slowest_cpu)
    whole_forecast = direct_all_reduce_seconds(size, n, bandwidth, 0.0, slowest_cpu)
    remote = [Messaging(m["remote_message_seconds"], m["remote_byte_seconds"]) for m in members]
    remote_forecast = ring_all_reduce_seconds(size, n, bandwidth, 0.0, Messaging.slowest(remote))
    remote_whole_forecast = direct_all_reduce_seconds(size, n, bandwidth, 0.0, Messaging.slowest(remote))
    ring = max(m["ring_seconds"] for m in members)
    whole = max(m["whole_seconds"] for m in members)
    slowest = min(range(n), key=lambda i: device_set.cpu_fractions[i])
    return {
        "device_set": device_set.name, "cpu_fractions": list(device_set.cpu_fractions), "bytes": size,
        "ring_seconds": ring, "forecast_seconds": forecast, "forecast_error": forecast / ring - 1,
        "whole_seconds": whole, "whole_forecast_seconds": whole_forecast,
        "whole_forecast_error": whole_forecast / whole - 1, "ring_over_whole": ring / whole,
        "remote_forecast_seconds": remote_forecast, "remote_forecast_error": remote_forecast / ring - 1,
        "remote_whole_forecast_seconds": remote_whole_forecast,
        "remote_whole_forecast_error": remote_whole_forecast / whole - 1,
        "remote_profile_hop_seconds": [p.hops(1, size / n) for p in remote],
        "planned_ring_min_bytes": ring_min_bytes(n, bandwidth, 0.0, slowest_cpu),
        "ring_round_cpu": [m["ring_cpu"] / rounds for m in members],
        "pair_round_cpu": [m["pair_round_cpu"] for m in members],
        "profile_hop_seconds": [p.hops(1, size / n) for p in profiles],
        "cpu_bound_seconds": max(m["ring_cpu"] / f for m, f in zip(members, device_set.cpu_fractions, strict=True)),
        "compute_seconds": members[slowest]["compute_seconds"],
        "compute_then_ring_seconds": members[slowest]["both_seconds"],
        "sum_alone_seconds": members[slowest]["compute_seconds"] + ring,
        "members": members,
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _table(console: Console, title: str, columns: tuple[str, ...], lines: list[list[str]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for line in lines:
        table.add_row(*line)
    console.print(table)


def print_tables(console: Console, rows: list[dict[str, Any]], numel: int) -> None:
    """The ring against its forecast; the same tensor exchanged whole beside it; CPU per ring round."""
    _table(console, f"ring all-reduce of {numel * 4} bytes among 4 testbed hosts, ms",
           ("set", "measured", "forecast", "error", "forecast, cross-host profile", "error", "ring CPU ÷ quota",
            "compute, then ring", "both alone"),
           [[r["device_set"], _ms(r["ring_seconds"]), _ms(r["forecast_seconds"]), f"{r['forecast_error']:+.0%}",
             _ms(r["remote_forecast_seconds"]), f"{r['remote_forecast_error']:+.0%}", _ms(r["cpu_bound_seconds"]), _ms(r["compute_then_ring_seconds"]), _ms(r["sum_alone_seconds"])]
            for r in rows])
    _table(console, "the same all-reduce exchanged whole (one round of n − 1 copies), side by side, ms",
           ("set", "round the ring", "exchanged whole", "ring ÷ whole", "whole: forecast", "error",
            "cross-host profile", "error", "planner's ring threshold"),
           [[r["device_set"], _ms(r["ring_seconds"]), _ms(r["whole_seconds"]), f"{r['ring_over_whole']:.2f}×",
             _ms(r["whole_forecast_seconds"]), f"{r['whole_forecast_error']:+.0%}",
             _ms(r["remote_whole_forecast_seconds"]), f"{r['remote_whole_forecast_error']:+.0%}",
             f"{r['planned_ring_min_bytes'] / 1024:.0f} KiB"] for r in rows])

    def each(values: list[float]) -> str:
        return " / ".join(_ms(v) for v in values)

    _table(console, "CPU ms per member per ring round (one value per host), and the profile's hop",
           ("set", "in the 4-host ring", "2-member ring inside the device", "profile hop (CPU ÷ share)",
            "cross-host profile hop"),
           [[r["device_set"], each(r["ring_round_cpu"]), each(r["pair_round_cpu"]), each(r["profile_hop_seconds"]),
             each(r["remote_profile_hop_seconds"])] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=8 * 32 * 96, help="float32 elements all-reduced")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console(width=200)
    reason = unavailable_reason()
    if reason is not None:
        console.print(f"bench.collectives: skipped: {reason}")
        return
    started = time.monotonic()
    rows = [summarise(s, measure(s, args.numel, args.repeats), args.numel) for s in (HOMOGENEOUS, HETEROGENEOUS)]
    print_tables(console, rows, args.numel)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"benchmark": "collectives", "created": time.time(), "machine": platform.node(),
                                       "numel": args.numel, "repeats": args.repeats, "cpu_period_us": CPU_PERIOD_US,
                                       "link_mbit": LINK_MBIT, "elapsed_seconds": time.monotonic() - started,
                                       "sets": rows}, indent=1))
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
