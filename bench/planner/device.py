"""One simulated device of the planner benchmark: a long-lived process that profiles and runs cetd jobs.

``python -m bench.planner.device`` is started once per device (and once for the driver), pinned to its
core and, for the three devices, moved into a cgroup with the device's CPU quota by the orchestrator
(`bench.planner.rig`). It then serves one JSON request per line on stdin, so that the benchmark pays
Python's and torch's start-up once per device rather than once per measured partition:

- ``profile``: the daemon profiler's measurement (`cetd.daemon.worker_main.run_profile`: one GPT-2 small
  block, micro-batch 8 × 32, forward + backward, median of the last 5 of 7 passes), done here with the
  same block, input and passes but timed with both clocks: wall seconds (what the daemon publishes; under
  the quota and the machine's other load) and this thread's CPU seconds (load-free). With ``parts`` it
  also times the workload's own parts (`bench.pipeline.split.measure_costs`, CPU seconds).
- ``driver``: cetd's `Driver` for the given spec and plan over a fresh `GrpcPeerChannel` (rank 0).
- ``worker``: cetd's `run_worker` for the given rank over a fresh `GrpcPeerChannel`.

The driver and worker roles talk to the orchestrator exactly as `bench.pipeline.cetd_job` does (events
``described``, ``ready``, ``done``; the peers message), with mutual TLS and only the job's devices
accepted, and time the channel with `bench.pipeline.channel_timer`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.pipeline.channel_timer import ChannelTimer, TimedChannel
from bench.pipeline.child import emit, read_message, start
from bench.pipeline.workload import load_workload
from cetd.identity import peer_device_id_from_pem
from cetd.ids import JobId
from cetd.runtime.spec import DRIVER_RANK, JobPlan, JobSpec, ModelDescription, StepReport, from_json, to_json
from cetd.transport.credentials import TlsMaterial
from cetd.transport.tensor_channel import GrpcPeerChannel

PROFILE_PASSES = 7
PROFILE_WARMUP = 2
"""As the daemon's profiler: 7 passes, the first 2 untimed."""


def _profile(request: dict[str, Any]) -> None:
    import torch
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    config = GPT2Config(n_embd=768, n_head=12, n_positions=64)
    config._attn_implementation = "eager"  # as the daemon's profiler and every training stage run it
    block = GPT2Block(config)  # type: ignore[no-untyped-call]  # transformers ships no types
    hidden = torch.randn(8, 32, 768, requires_grad=True)
    wall, cpu = [], []
    for index in range(PROFILE_PASSES):
        started, started_cpu = time.perf_counter(), time.thread_time()
        out = block(hidden)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        if index >= PROFILE_WARMUP:
            wall.append(time.perf_counter() - started)
            cpu.append(time.thread_time() - started_cpu)
    samples = hidden.shape[0]
    fields: dict[str, Any] = {
        "block_seconds_wall": statistics.median(wall) / samples,
        "block_seconds_cpu": statistics.median(cpu) / samples,
    }
    spec = from_json(JobSpec, json.dumps(request["spec"]))
    loaded = load_workload(spec)
    # What a daemon measures before planning the job (`cetd.daemon.shape_profiles`): the model's own block,
    # embedding, head and AdamW step at the job's micro-batch, sustained under the device's quota.
    from dataclasses import asdict

    from cetd.runtime.driver import describe_model
    from cetd.runtime.profiling import profile_shape

    shape = profile_shape(describe_model(loaded.model, loaded.adapter),
                          micro_batch=spec.global_batch // spec.micro_batches, seq_len=spec.seq_len)
    fields["shape"] = asdict(shape)
    if request.get("parts"):
        from bench.pipeline.split import measure_costs

        batch = loaded.step_batches(spec, 0)[0]
        fields["parts"] = measure_costs(loaded.model, loaded.adapter, batch, repeats=5).to_dict()
    emit("profiled", **fields)


def _channel(request: dict[str, Any], plan: JobPlan) -> GrpcPeerChannel:
    files = request["tls"]
    members = frozenset(request["members"])

    def authorize(pem: bytes) -> bool:
        return str(peer_device_id_from_pem(pem)) in members

    tls = TlsMaterial(
        key_pem=Path(files["key"]).read_bytes(),
        cert_chain_pem=Path(files["chain"]).read_bytes(),
        ca_pem=Path(files["ca"]).read_bytes(),
    )
    return GrpcPeerChannel(rank=int(request["rank"]), world_size=plan.world_size, job_id=JobId("bench-planner"),
                           tls=tls, authorize=authorize)


def _peers(message: dict[str, Any], own_rank: int) -> dict[int, tuple[str, str]]:
    return {int(r): (address, name) for r, (address, name) in message["peers"].items() if int(r) != own_rank}


def _driver(request: dict[str, Any], spec: JobSpec, plan: JobPlan) -> None:
    from cetd.runtime.driver import Driver

    driver = Driver(spec)
    emit("described", description=json.loads(to_json(driver.describe())))
    with _channel(request, plan) as channel:
        emit("ready", address=channel.address)
        channel.connect(_peers(read_message(), DRIVER_RANK))
        timer = ChannelTimer(open_step=int(request["warmup"]) + 1, close_step=spec.steps + 1)
        reports: list[StepReport] = []
        result = driver.run(plan, TimedChannel(channel, timer), reports.append)
        emit("done", seconds=[r.seconds for r in reports], losses=result.losses, stats=timer.report())


def _worker(request: dict[str, Any], spec: JobSpec, plan: JobPlan) -> None:
    from cetd.runtime.worker import run_worker

    rank = int(request["rank"])
    with _channel(request, plan) as channel:
        emit("ready", address=channel.address)
        message = read_message()
        channel.connect(_peers(message, rank))
        description = from_json(ModelDescription, json.dumps(message["description"]))
        timer = ChannelTimer(open_step=int(request["warmup"]) + 1, close_step=spec.steps + 1)
        run_worker(spec, plan, rank, description, TimedChannel(channel, timer), num_threads=1)
        emit("done", stats=timer.report())


def main() -> None:
    start("planner-device")  # pins to the launch message's core, one torch thread
    emit("started")
    while True:
        request = read_message()  # exits quietly when the orchestrator closes stdin
        if request["op"] == "profile":
            _profile(request)
            continue
        spec = from_json(JobSpec, json.dumps(request["spec"]))
        plan = from_json(JobPlan, json.dumps(request["plan"]))
        if request["op"] == "driver":
            _driver(request, spec, plan)
        else:
            _worker(request, spec, plan)


if __name__ == "__main__":
    main()
