"""Contender (b): cetd's pipeline, one driver process and one process per stage over mutual-TLS gRPC.

``python -m bench.pipeline.cetd_job`` runs either role of a job, as the daemon's job processes do:

- driver (unpinned): `Driver.describe`, then a `GrpcPeerChannel` as rank 0, then `Driver.run` with the
  hand-built pipeline plan; reports every step (`StepReport`) and where its thread waited.
- worker (pinned to its own core, one torch thread): its own `GrpcPeerChannel`, then `run_worker`;
  reports where its thread waited and the CPU seconds of its threads over the timed steps.

Each process presents its own device certificate from a household CA made for the run, and accepts
only the job's three devices (`authorize` checks the peer's device ID), as the daemon does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.pipeline.channel_timer import ChannelTimer, TimedChannel
from bench.pipeline.child import emit, read_message, start
from cetd.identity import peer_device_id_from_pem
from cetd.ids import JobId
from cetd.runtime.spec import DRIVER_RANK, JobPlan, JobSpec, ModelDescription, StepReport, from_json, to_json
from cetd.transport.credentials import TlsMaterial
from cetd.transport.tensor_channel import GrpcPeerChannel


@dataclass(frozen=True, slots=True, kw_only=True)
class _Launch:
    role: str
    rank: int
    spec: JobSpec
    plan: JobPlan
    tls: TlsMaterial
    members: frozenset[str]
    warmup: int

    @classmethod
    def parse(cls, launch: dict[str, Any]) -> _Launch:
        files = launch["tls"]
        return cls(
            role=launch["role"],
            rank=int(launch["rank"]),
            spec=from_json(JobSpec, json.dumps(launch["spec"])),
            plan=from_json(JobPlan, json.dumps(launch["plan"])),
            tls=TlsMaterial(
                key_pem=Path(files["key"]).read_bytes(),
                cert_chain_pem=Path(files["chain"]).read_bytes(),
                ca_pem=Path(files["ca"]).read_bytes(),
            ),
            members=frozenset(launch["members"]),
            warmup=int(launch["warmup"]),
        )

    def channel(self) -> GrpcPeerChannel:
        def authorize(pem: bytes) -> bool:
            return str(peer_device_id_from_pem(pem)) in self.members

        return GrpcPeerChannel(
            rank=self.rank, world_size=self.plan.world_size, job_id=JobId("bench-pipeline"), tls=self.tls,
            authorize=authorize,
        )


def _peers(message: dict[str, Any], own_rank: int) -> dict[int, tuple[str, str]]:
    return {int(r): (address, name) for r, (address, name) in message["peers"].items() if int(r) != own_rank}


def _run_driver(launch: _Launch) -> None:
    from cetd.runtime.driver import Driver

    driver = Driver(launch.spec)
    emit("described", description=json.loads(to_json(driver.describe())))
    with launch.channel() as channel:
        emit("ready", address=channel.address)
        channel.connect(_peers(read_message(), DRIVER_RANK))
        timer = ChannelTimer(open_step=launch.warmup + 1, close_step=launch.spec.steps + 1)
        reports: list[StepReport] = []

        def on_step(report: StepReport) -> None:
            reports.append(report)

        result = driver.run(launch.plan, TimedChannel(channel, timer), on_step)
        emit(
            "done",
            seconds=[r.seconds for r in reports],
            losses=result.losses,
            total_seconds=result.seconds,
            stats=timer.report(),
        )


def _run_worker(launch: _Launch) -> None:
    from cetd.runtime.worker import run_worker

    with launch.channel() as channel:
        emit("ready", address=channel.address)
        message = read_message()
        channel.connect(_peers(message, launch.rank))
        description = from_json(ModelDescription, json.dumps(message["description"]))
        timer = ChannelTimer(open_step=launch.warmup + 1, close_step=launch.spec.steps + 1)
        run_worker(launch.spec, launch.plan, launch.rank, description, TimedChannel(channel, timer), num_threads=1)
        emit("done", stats=timer.report())


def main() -> None:
    launch = _Launch.parse(start("cetd"))
    if launch.role == "driver":
        _run_driver(launch)
    else:
        _run_worker(launch)


if __name__ == "__main__":
    main()
