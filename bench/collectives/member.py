"""One ring member of `bench.collectives.run`, inside its host's namespace and CPU-capped cgroup.

    python -m bench.collectives.member RANK HOST_IP WORKDIR NUMEL REPEATS ECHOES
    python -m bench.collectives.member echo RANK WORKDIR ADDRESS     (the profile's far end, started by a member)

Prints nothing; writes ``WORKDIR/result<RANK>.json``:

- ``message_seconds``, ``byte_seconds``: the daemon's own transport profile of this device
  (`cetd.runtime.transport_profile.profile_transport` against an echo in a second process, both on 127.0.0.1,
  both ends' CPU over the device's share of a core), which the cost model paces rings by;
- ``remote_message_seconds``, ``remote_byte_seconds``: the profile the daemon takes where another device
  echoes: against an echo on host ``ECHOES[RANK]`` (a comma-separated host per member; the run picks the
  fastest other host, as `cetd.daemon.shape_profiles.echo_order` does), this end's CPU over its share
  (`near_hop_seconds`), one member at a time as the daemon's profiler takes the devices of one machine;
- ``cpu_share``: that share, CPU-seconds per wall second on a compute loop (so ``message_seconds ×
  cpu_share`` is the profile's CPU per hop, to set beside the ring's);
- ``pair_round_seconds``, ``pair_round_cpu``: one member's ring round when both members of a 2-member
  `all_reduce_` are on this device (wall and CPU, per member and round);
- ``ring_seconds``, ``ring_cpu``: one `all_reduce_` of NUMEL float32 among all hosts round the ring, wall
  and this process's CPU (mean of REPEATS); ``whole_seconds``, ``whole_cpu``: the same all-reduce with the
  tensor exchanged whole (`JobPlan.ring_min_bytes` above its size);
- ``compute_seconds``, ``compute_cpu``: a fixed matrix-multiply burst alone, and ``both_seconds``,
  ``both_cpu``: the burst followed by the all-reduce (a tensor-parallel segment and its sync).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from cetd.ids import JobId
from cetd.runtime.collectives import all_reduce_
from cetd.runtime.timing import cpu_seconds
from cetd.runtime.transport_profile import (
    PhaseCost,
    echo_transport,
    hop_cpu_seconds,
    near_hop_seconds,
    profile_transport,
)
from cetd.transport.channel import TensorKey
from cetd.transport.tensor_channel import GrpcPeerChannel, TensorChannelConfig

BURST = 20
"""Matrix multiplies (256 × 256) per compute burst: about 6 ms of one core."""
TIMEOUT = timedelta(seconds=120)
WHOLE = 2**40
"""A ``ring_min_bytes`` above any tensor here: exchanged whole."""


def main(rank: int, ip: str, workdir: Path, numel: int, repeats: int, echoes: list[int]) -> None:
    torch.set_num_threads(1)
    devices = pickle.loads((workdir / "tls.pkl").read_bytes())
    me, world = devices[rank], len(devices)
    config = TensorChannelConfig(timeout=TIMEOUT)

    def channel(r: int, size: int, job: str, host: str) -> GrpcPeerChannel:
        return GrpcPeerChannel(rank=r, world_size=size, job_id=JobId(job), tls=me.tls, authorize=lambda pem: True,
                               host=host, config=config)

    result: dict[str, float] = {}
    with channel(0, 2, "profile", "127.0.0.1") as near:
        share = _cpu_share()
        result["cpu_share"] = share
        result["message_seconds"], result["byte_seconds"] = _profile_against_echo(rank, workdir, near, me.tls_name,
                                                                                  share)
    result["remote_message_seconds"], result["remote_byte_seconds"] = _profile_across_hosts(
        rank, ip, workdir, devices, config, share, echoes)
    with channel(0, 2, "pair", "127.0.0.1") as near, channel(1, 2, "pair", "127.0.0.1") as far:
        near.connect({1: (far.address, me.tls_name)})
        far.connect({0: (near.address, me.tls_name)})
        pairs = 60
        buffers = [torch.ones(2 * (numel // world)) for _ in range(2)]

        def member(ch: GrpcPeerChannel, buffer: torch.Tensor) -> None:
            for i in range(pairs):
                all_reduce_(ch, buffer, ranks=[0, 1], key=TensorKey(step=i + 1, micro_batch=0, name="pair"),
                            timeout=TIMEOUT)

        started, used = time.perf_counter(), cpu_seconds()
        other = threading.Thread(target=member, args=(far, buffers[1]))
        other.start()
        member(near, buffers[0])
        other.join()
        rounds = pairs * 2 * 2  # two rounds per all-reduce, two members' work on this device
        result["pair_round_seconds"] = (time.perf_counter() - started) / rounds
        result["pair_round_cpu"] = (cpu_seconds() - used) / rounds

    x, w = torch.randn(256, 256), torch.randn(256, 256)

    def burst() -> None:
        for _ in range(BURST):
            torch.mm(x, w)

    with channel(rank, world, "ring", ip) as ring:
        (workdir / f"address{rank}").write_text(ring.address)
        while not all((workdir / f"address{r}").exists() for r in range(world)):
            time.sleep(0.05)
        ring.connect({r: ((workdir / f"address{r}").read_text(), devices[r].tls_name)
                      for r in range(world) if r != rank})
        counter = 0

        def reduce(tensor: torch.Tensor, threshold: int = 1) -> None:
            nonlocal counter
            counter += 1
            all_reduce_(ring, tensor, ranks=list(range(world)), key=TensorKey(step=counter, micro_batch=0, name="x"),
                        timeout=TIMEOUT, ring_min_bytes=threshold)

        buffer, barrier = torch.ones(numel), torch.ones(8)

        def timed(name: str, body: list[str]) -> None:
            reduce(barrier, WHOLE)  # everyone starts together
            started, used = time.perf_counter(), cpu_seconds()
            for _ in range(repeats):
                if "compute" in body:
                    burst()
                if "reduce" in body:
                    reduce(buffer)
                if "whole" in body:
                    reduce(buffer, WHOLE)
            result[f"{name}_seconds"] = (time.perf_counter() - started) / repeats
            result[f"{name}_cpu"] = (cpu_seconds() - used) / repeats

        for _ in range(3):
            reduce(buffer)  # warm the streams
        timed("ring", ["reduce"])
        timed("whole", ["whole"])
        timed("compute", ["compute"])
        timed("both", ["compute", "reduce"])
        reduce(barrier, WHOLE)
    (workdir / f"result{rank}.json").write_text(json.dumps(result))


def _cpu_share(seconds: float = 0.5) -> float:
    """CPU-seconds per wall second this process gets on a compute loop (as the profiler's block piece)."""
    x = torch.randn(256, 256)
    started, used = time.perf_counter(), cpu_seconds()
    while time.perf_counter() - started < seconds:
        torch.mm(x, x)
    return (cpu_seconds() - used) / (time.perf_counter() - started)


def _profile_against_echo(rank: int, workdir: Path, near: GrpcPeerChannel, tls_name: str,
                          share: float) -> tuple[float, float]:
    """The daemon's transport profile: `profile_transport` from ``near`` against `echo` in a second process,
    both ends' CPU over this device's share (`hop_cpu_seconds`)."""
    address_file, costs_file = workdir / f"echo{rank}", workdir / f"echo{rank}.json"
    echo_process = subprocess.Popen([sys.executable, "-m", "bench.collectives.member", "echo", str(rank), str(workdir),
                                     near.address])
    try:
        while not address_file.exists():
            if echo_process.poll() is not None:
                raise SystemExit(f"member {rank}: the transport echo exited with {echo_process.returncode}")
            time.sleep(0.05)
        near.connect({1: (address_file.read_text(), tls_name)})
        timed = profile_transport(near, 1)
    finally:
        echo_process.wait(timeout=120)
    far = {name: PhaseCost(**cost) for name, cost in json.loads(costs_file.read_text()).items()}
    return hop_cpu_seconds(timed, far, share)


def _profile_across_hosts(rank: int, ip: str, workdir: Path, devices: list[Any], config: TensorChannelConfig,
                          share: float, echoes: list[int]) -> tuple[float, float]:
    """Every member in turn times its transport against the echo on host ``echoes[member]``; this member
    takes its turn, echoes for the members that chose it, and waits out the others'."""
    me = devices[rank]

    def channel(end: int, turn: int) -> GrpcPeerChannel:
        return GrpcPeerChannel(rank=end, world_size=2, job_id=JobId(f"remote{turn}"), tls=me.tls,
                               authorize=lambda pem: True, host=ip, config=config)

    costs = (0.0, 0.0)
    for turn in range(len(devices)):
        if turn == rank:
            with channel(0, turn) as near:
                _publish(workdir / f"remote-near{turn}", near.address)
                near.connect({1: (_wait_for(workdir / f"remote-echo{turn}"), devices[echoes[turn]].tls_name)})
                costs = near_hop_seconds(profile_transport(near, 1), share)
            _publish(workdir / f"remote-done{turn}", "")
        elif echoes[turn] == rank:
            with channel(1, turn) as far:
                _publish(workdir / f"remote-echo{turn}", far.address)
                far.connect({0: (_wait_for(workdir / f"remote-near{turn}"), devices[turn].tls_name)})
                echo_transport(far, 0)
        _wait_for(workdir / f"remote-done{turn}")
    return costs


def _wait_for(path: Path) -> str:
    """The text of a file another member publishes (`_publish`), once it exists."""
    while not path.exists():
        time.sleep(0.02)
    return path.read_text()


def _publish(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole (a rename), for another process to wait for."""
    path.with_suffix(".tmp").write_text(text)
    path.with_suffix(".tmp").rename(path)


def echo(rank: int, workdir: Path, address: str) -> None:
    devices = pickle.loads((workdir / "tls.pkl").read_bytes())
    me = devices[rank]
    with GrpcPeerChannel(rank=1, world_size=2, job_id=JobId("profile"), tls=me.tls, authorize=lambda pem: True,
                         host="127.0.0.1", config=TensorChannelConfig(timeout=TIMEOUT)) as far:
        _publish(workdir / f"echo{rank}", far.address)
        far.connect({0: (address, me.tls_name)})
        phases = echo_transport(far, 0)
    (workdir / f"echo{rank}.json").write_text(json.dumps({name: {"messages": c.messages, "cpu_seconds": c.cpu_seconds}
                                                           for name, c in phases.items()}))


if __name__ == "__main__":
    if sys.argv[1] == "echo":
        echo(int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    else:
        main(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
             [int(e) for e in sys.argv[6].split(",")])
