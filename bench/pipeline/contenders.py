"""The three contenders' runs: each starts its processes fresh, feeds them the job and collects their steps.

`run_single`, `run_cetd` and `run_torch` each start their processes (`bench.pipeline.processes`),
send them the job spec, the cores to pin to and, for the pipelines, the block boundaries chosen from
the measured stage costs (`Bench.boundaries`), and turn what they report into a `Run`. cetd's run
also gets a household CA made for the benchmark (`make_devices`): the driver and both workers present
their own device certificates and accept only each other.
"""

from __future__ import annotations

import json
import socket
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.pipeline.processes import Children
from bench.pipeline.report import Run
from bench.pipeline.split import StageCosts, balanced_split
from bench.pipeline.workload import Workload
from cetd.identity.ca import certificate_pem, create_household_ca, issue_device_certificate, tls_server_name
from cetd.identity.keys import device_id_from_public_key, generate_private_key, private_key_pem
from cetd.runtime.spec import JobPlan, JobSpec, Schedule, WorkerAssignment, to_json

__all__ = ["RUNNERS", "Bench", "Device", "make_devices", "measure_costs", "run_cetd", "run_single", "run_torch"]

_RUN_TIMEOUT = 300.0
"""Longest wait for one event of a benchmark process (a whole run under heavy outside load included)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """One process's identity in the cetd run: certificate files and the name peers dial it by."""

    device_id: str
    tls_name: str
    files: dict[str, str]


@dataclass(slots=True, kw_only=True)
class Bench:
    """Everything a contender's run needs."""

    workload: Workload
    folder: Path
    data: Path
    logs: Path
    devices: list[Device]
    warmup: int
    steps: int
    schedule: Schedule
    costs: StageCosts | None = None

    def spec(self, micro_batches: int) -> JobSpec:
        return self.workload.job_spec(
            self.folder, self.data, micro_batches=micro_batches, steps=self.warmup + self.steps, schedule=self.schedule
        )

    def boundaries(self, micro_batches: int) -> tuple[int, ...]:
        assert self.costs is not None, "the single-device run measures the costs first"
        return balanced_split(self.costs, 2, micro_batches)


def make_devices(directory: Path, count: int) -> list[Device]:
    """A household CA and ``count`` device certificates, written as PEM files under ``directory``."""
    ca_key, ca_cert = create_household_ca()
    ca_pem = certificate_pem(ca_cert)
    (directory / "ca.pem").write_bytes(ca_pem)
    devices = []
    for index in range(count):
        key = generate_private_key()
        cert = issue_device_certificate(ca_key, ca_cert, key.public_key(), name=f"bench-{index}")
        key_file, chain_file = directory / f"device{index}.key", directory / f"device{index}.pem"
        key_file.write_bytes(private_key_pem(key))
        key_file.chmod(0o600)
        chain_file.write_bytes(certificate_pem(cert) + ca_pem)
        device_id = device_id_from_public_key(key.public_key())
        devices.append(
            Device(
                device_id=str(device_id),
                tls_name=tls_server_name(device_id),
                files={"key": str(key_file), "chain": str(chain_file), "ca": str(directory / "ca.pem")},
            )
        )
    return devices


def _spec_json(spec: JobSpec) -> Any:
    return json.loads(to_json(spec))


def measure_costs(bench: Bench, micro_batches: int) -> None:
    """Measure the stage costs in a process of their own (when no single-device run does it)."""
    with Children(bench.logs) as children:
        child = children.start("bench.pipeline.single", "profile")
        child.send(spec=_spec_json(bench.spec(micro_batches)), core=0, threads=1, profile=True, profile_only=True)
        bench.costs = _costs(child.expect("costs", _RUN_TIMEOUT)["costs"])


def _costs(fields: dict[str, Any]) -> StageCosts:
    return StageCosts(
        embedding=float(fields["embedding"]),
        blocks=tuple(float(b) for b in fields["blocks"]),
        head=float(fields["head"]),
        adamw_per_parameter=float(fields["adamw_per_parameter"]),
        embedding_parameters=int(fields["embedding_parameters"]),
        block_parameters=tuple(int(p) for p in fields["block_parameters"]),
        head_parameters=int(fields["head_parameters"]),
    )


def run_single(bench: Bench, micro_batches: int, round_number: int) -> Run:
    spec = bench.spec(micro_batches)
    profile = bench.costs is None
    with Children(bench.logs) as children:
        child = children.start("bench.pipeline.single", f"single-m{micro_batches}-r{round_number}")
        child.send(spec=_spec_json(spec), core=0, threads=1, profile=profile)
        if profile:
            bench.costs = _costs(child.expect("costs", _RUN_TIMEOUT)["costs"])
        done = child.expect("done", _RUN_TIMEOUT)
    timed = slice(bench.warmup, None)
    return Run(
        contender="single", micro_batches=micro_batches, round=round_number, step_seconds=done["seconds"],
        losses=done["losses"], warmup=bench.warmup, global_batch=spec.global_batch,
        wait_share=sum(done["wait_seconds"][timed]) / sum(done["seconds"][timed]),
        cpu_per_step=[_cpu_per_step(done, timed)],
        stats={"cpu_seconds": done["cpu_seconds"], "wait_seconds": done["wait_seconds"]},
    )


def _cpu_per_step(report: dict[str, Any], timed: slice) -> tuple[float, float]:
    """(main thread, other threads) CPU seconds per timed step of a `step_report`."""
    main = statistics.mean(report["cpu_seconds"][timed])
    return main, statistics.mean(report["process_cpu_seconds"][timed]) - main


def pipeline_plan(bench: Bench, micro_batches: int) -> JobPlan:
    """The hand-built 2-stage plan: driver rank 0, stage s on rank s + 1, balanced boundaries."""
    boundaries = bench.boundaries(micro_batches)
    workers = tuple(
        WorkerAssignment(
            rank=stage + 1,
            device_id=bench.devices[stage + 1].device_id,
            stage=stage,
            start_block=boundaries[stage],
            end_block=boundaries[stage + 1],
        )
        for stage in range(len(boundaries) - 1)
    )
    return JobPlan(
        parallelism="pipeline",
        workers=workers,
        schedule=bench.schedule,
        micro_batches=micro_batches,
        reason=f"benchmark: blocks split {list(boundaries)} by measured stage cost",
    )


def run_cetd(bench: Bench, micro_batches: int, round_number: int) -> Run:
    spec = bench.spec(micro_batches)
    plan = pipeline_plan(bench, micro_batches)
    members = [device.device_id for device in bench.devices]
    common = {"spec": _spec_json(spec), "plan": json.loads(to_json(plan)), "members": members,
              "warmup": bench.warmup, "threads": 1}
    name = f"cetd-m{micro_batches}-r{round_number}"
    with Children(bench.logs) as children:
        processes = [children.start("bench.pipeline.cetd_job", f"{name}-rank{rank}") for rank in range(plan.world_size)]
        for rank, process in enumerate(processes):
            process.send(role="driver" if rank == 0 else "worker", rank=rank, core=None if rank == 0 else rank - 1,
                         tls=bench.devices[rank].files, **common)
        description = processes[0].expect("described", _RUN_TIMEOUT)["description"]
        addresses = [process.expect("ready", _RUN_TIMEOUT)["address"] for process in processes]
        peers = {str(rank): [address, bench.devices[rank].tls_name] for rank, address in enumerate(addresses)}
        processes[0].send(peers=peers)
        for process in processes[1:]:
            process.send(peers=peers, description=description)
        done = processes[0].expect("done", _RUN_TIMEOUT)
        workers = [process.expect("done", _RUN_TIMEOUT)["stats"] for process in processes[1:]]
    wait = sum(w["thread_wait_s"].get(w["main_thread"], 0.0) for w in workers) / sum(w["window_s"] for w in workers)
    return Run(
        contender="cetd", micro_batches=micro_batches, round=round_number, step_seconds=done["seconds"],
        losses=done["losses"], warmup=bench.warmup, global_batch=spec.global_batch, wait_share=wait,
        cpu_per_step=[_window_cpu_per_step(w, bench.steps) for w in workers],
        stats={"driver": done["stats"], "workers": workers, "boundaries": list(bench.boundaries(micro_batches))},
    )


def _window_cpu_per_step(stats: dict[str, Any], steps: int) -> tuple[float, float]:
    threads = stats["thread_cpu_s"]
    main = threads.get(stats["main_thread"], 0.0)
    return main / steps, (sum(threads.values()) - main) / steps


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def run_torch(bench: Bench, micro_batches: int, round_number: int) -> Run:
    spec = bench.spec(micro_batches)
    boundaries = list(bench.boundaries(micro_batches))
    port = _free_port()
    name = f"torch-m{micro_batches}-r{round_number}"
    with Children(bench.logs) as children:
        processes = [children.start("bench.pipeline.torch_job", f"{name}-rank{rank}") for rank in range(2)]
        for rank, process in enumerate(processes):
            process.send(spec=_spec_json(spec), rank=rank, core=rank, threads=1, boundaries=boundaries, port=port)
        first, last = (process.expect("done", _RUN_TIMEOUT) for process in processes)
    timed = slice(bench.warmup, None)
    wait = sum(sum(rank["wait_seconds"][timed]) for rank in (first, last)) / (2 * sum(last["seconds"][timed]))
    return Run(
        contender="torch", micro_batches=micro_batches, round=round_number, step_seconds=last["seconds"],
        losses=last["losses"], warmup=bench.warmup, global_batch=spec.global_batch, wait_share=wait,
        cpu_per_step=[_cpu_per_step(rank, timed) for rank in (first, last)],
        stats={"ranks": [first, last], "boundaries": boundaries},
    )


RUNNERS: dict[str, Callable[[Bench, int, int], Run]] = {
    "single": run_single,
    "cetd": run_cetd,
    "torch": run_torch,
}
