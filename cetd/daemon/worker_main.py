"""Entry point of a job process (driver or worker), started fresh by the daemon — never forked.

The daemon talks to it over stdin/stdout, one JSON object per line:

    daemon → process   {"role": "driver"|"worker", "job_id", "spec", "rank", "plan"?, "description"?,
                        "state_dir", "host", "threads"}
    process → daemon   {"event": "described", "description": {...}}            (driver only)
    daemon → process   {"plan": {...}}                                          (driver only)
    process → daemon   {"event": "ready", "address": "host:port"}
    daemon → process   {"peers": {"1": ["host:port", "tls-name"], ...}}
    process → daemon   {"event": "step", "step", "loss", "seconds", "samples"}   (driver only)
    process → daemon   {"event": "done", ...} | {"event": "failed", "reason": "one line"}

This process is the composition root for torch work: it owns the tensor channel (mutual TLS with the
device's identity; peers are checked against the roster) and runs the runtime's driver or worker.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from cetd.errors import CetdError
from cetd.identity import StateDir, load_identity, load_roster, peer_device_id_from_pem
from cetd.ids import JobId
from cetd.runtime.spec import JobPlan, JobSpec, ModelDescription, StepReport, from_json, to_json
from cetd.transport.channel import TransportError
from cetd.transport.credentials import TlsMaterial

logger = logging.getLogger("cetd.worker")


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def read_message() -> dict[str, Any]:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit(0)  # the daemon went away: stop quietly
    message: dict[str, Any] = json.loads(line)
    return message


def _channel(launch: dict[str, Any], rank: int, world_size: int) -> Any:
    from cetd.transport.tensor_channel import GrpcPeerChannel

    state = StateDir(launch["state_dir"])
    identity = load_identity(state)
    roster = load_roster(state)
    material = TlsMaterial(key_pem=identity.key_pem, cert_chain_pem=identity.cert_chain_pem, ca_pem=identity.ca_pem)

    def authorize(pem: bytes) -> bool:
        return roster.is_member(peer_device_id_from_pem(pem))

    return GrpcPeerChannel(rank=rank, world_size=world_size, job_id=JobId(launch["job_id"]), tls=material,
                           authorize=authorize, host=launch["host"], port=0)


def _peers(message: dict[str, Any], own_rank: int) -> dict[int, tuple[str, str]]:
    return {int(rank): (address, name) for rank, (address, name) in message["peers"].items()
            if int(rank) != own_rank}


def run_driver(launch: dict[str, Any]) -> None:
    from cetd.runtime.driver import Driver

    spec = from_json(JobSpec, json.dumps(launch["spec"]))
    driver = Driver(spec)
    description = driver.describe()
    emit("described", description=json.loads(to_json(description)))
    plan = from_json(JobPlan, json.dumps(read_message()["plan"]))
    with _channel(launch, 0, plan.world_size) as channel:
        emit("ready", address=channel.address)
        channel.connect(_peers(read_message(), 0))

        def on_step(report: StepReport) -> None:
            emit("step", step=report.step, loss=report.loss, seconds=report.seconds, samples=report.samples)

        result = driver.run(plan, channel, on_step)
    emit("done", seconds=result.seconds, samples=result.samples, output=result.output)


def run_worker_process(launch: dict[str, Any]) -> None:
    from cetd.runtime.worker import run_worker

    spec = from_json(JobSpec, json.dumps(launch["spec"]))
    plan = from_json(JobPlan, json.dumps(launch["plan"]))
    description = from_json(ModelDescription, json.dumps(launch["description"]))
    rank = int(launch["rank"])
    with _channel(launch, rank, plan.world_size) as channel:
        emit("ready", address=channel.address)
        channel.connect(_peers(read_message(), rank))
        run_worker(spec, plan, rank, description, channel)
    emit("done")


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s [worker] %(name)s: %(message)s")
    launch = read_message()
    threads = int(launch.get("threads") or 0) or (os.cpu_count() or 1)
    import torch

    torch.set_num_threads(threads)
    try:
        if launch["role"] == "driver":
            run_driver(launch)
        else:
            run_worker_process(launch)
    except (CetdError, TransportError) as error:
        emit("failed", reason=str(error))
        return getattr(error, "exit_code", 1)
    except Exception as error:  # a bug or an out-of-memory: the job step fails, never the daemon
        logger.exception("job process crashed")
        emit("failed", reason=f"{type(error).__name__}: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
