"""Entry point of a job process (driver or worker), started fresh by the daemon — never forked.

The daemon talks to it over stdin/stdout, one JSON object per line:

    daemon → process   {"role": "driver"|"worker", "job_id", "spec", "rank", "plan"?, "description"?,
                        "state_dir", "host", "threads", "checkpoint_dir", "device_id"}
    process → daemon   {"event": "described", "description": {...}, "cpu_seconds"}   (driver only)
    daemon → process   {"plan": {...}, "term": t, "resume": bool}               (driver, once per incarnation)
    process → daemon   {"event": "ready", "address": "host:port"}
    daemon → process   {"peers": {"1": ["host:port", "tls-name"], ...}}
    process → daemon   {"event": "training", "cpu_seconds"}   (worker: its share is built and loaded; the CPU
                        and metered energy before it are its start-up, kept apart from the job's J/sample)
    process → daemon   {"event": "step", ...} | {"event": "checkpoint", "step", "manifest"}   (driver)
    process → daemon   {"event": "lost", "reason", "failed_rank", "last_step", "checkpoint_step"} (driver:
                        a worker failed or a migration was asked; the daemon sends the next plan)
    process → daemon   {"event": "paused", "reason"}   (driver: a checkpoint could not be written)
    process → daemon   {"event": "done", ...} | {"event": "failed", "reason": "one line"}
    daemon → process   {"abort": "reason"} (a peer is dead: end the step now) | {"migrate": true}
                        (checkpoint at the next step boundary and stop, e.g. a device drains)

A profiler process:

    daemon → process   {"role": "profile", "threads", "description"?, "micro_batch"?, "seq_len"?, "precision"?,
                        "state_dir"?, "host"?, "remote_echo"?, "retime"?, "transport"?, "cpu_share"?}
    process → daemon   {"event": "transport", "address": "host:port"}   (with "remote_echo": its profile
                        channel listens; the daemon finds another device to echo it)
    daemon → process   {"echo": ["host:port", "tls-name"] | null}   (null: no device would; echo here)
    process → daemon   {"event": "profiled", "times": {...}, "echo": "remote"|"local"|""} (the model's
                        shapes) | {"event": "profiled", "block_seconds"} (the reference block) |
                        {"event": "profiled", "block": {"block_seconds", "cpu_share"}?,
                        "transport": {"message_seconds", "byte_seconds"}?, "echo"} (with "retime": the
                        shape's block alone when a "description" is given, then — unless "transport" is
                        false — the transport at the share the block had, else at "cpu_share")

An echo process — on another device at its daemon's request (the Echo RPC), or a second process of
this device — gets ``{"role": "echo", "state_dir", "threads", "host"?, "peer": ["host:port",
"tls-name"]}``, answers ``{"event": "ready", "address"}``, sends every tensor message straight back
until the profile ends, then answers ``{"event": "echoed", "phases": {name: {"messages", "cpu_seconds"}}}``
(its CPU per phase).

This process is the composition root for torch work: it owns the tensor channel (mutual TLS with the
device's identity; peers are checked against the roster) and runs the runtime's driver or worker.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from cetd.daemon.shape_profiles import ECHO_TIMEOUT
from cetd.errors import CetdError
from cetd.identity import StateDir, load_identity, load_roster, peer_device_id_from_pem
from cetd.ids import JobId
from cetd.runtime.spec import JobPlan, JobSpec, ModelDescription, StepReport, from_json, to_json
from cetd.transport.channel import TensorMismatch, TransportError
from cetd.transport.credentials import TlsMaterial

logger = logging.getLogger("cetd.worker")


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class DaemonLink:
    """Messages from the daemon on stdin, read by one thread for the life of the process.

    Control messages (``abort``, ``migrate``) act at once — ``abort`` closes the tensor channel so that a
    step blocked on a dead peer ends now — everything else is queued for the main thread.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._channel: Any = None
        self.migrate_requested = threading.Event()
        self.abort_reason = ""
        threading.Thread(target=self._read, name="daemon-link", daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            message: dict[str, Any] = json.loads(line)
            if "abort" in message:
                self.abort_reason = str(message["abort"])
                channel = self._channel
                if channel is not None:
                    channel.abort(self.abort_reason)
            elif "migrate" in message:
                self.migrate_requested.set()
            else:
                self._queue.put(message)
        self._queue.put(None)

    def next(self) -> dict[str, Any]:
        message = self._queue.get()
        if message is None:
            raise SystemExit(0)  # the daemon went away: stop quietly
        return message

    def attach(self, channel: Any) -> None:
        self._channel = channel
        self.abort_reason = ""
        self.migrate_requested.clear()


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


def _newest_intact_state(checkpoint_dir: Path, job_id: str) -> Any:
    """The state of the newest complete checkpoint whose shards all pass their checksums, or None.

    A corrupt or missing shard never goes unnoticed: that checkpoint is skipped (logged) and the one
    before it is used, which costs at most one more checkpoint interval of work.
    """
    from cetd.runtime.checkpoint import CheckpointError, complete_checkpoints, load_full_state, newest_first, verify

    for manifest in newest_first(complete_checkpoints(checkpoint_dir, job_id)):
        bad = verify(manifest, checkpoint_dir)
        if bad:
            logger.error("checkpoint at step %d failed its checksum check (%s); trying an older one",
                         manifest.step, ", ".join(bad))
            continue
        try:
            return load_full_state(manifest, checkpoint_dir)
        except CheckpointError as error:
            logger.error("checkpoint at step %d unusable: %s; trying an older one", manifest.step, error)
    return None


def run_driver(launch: dict[str, Any], link: DaemonLink) -> None:
    """Describe the job, then run one incarnation per plan the daemon sends until the job ends."""
    from cetd.runtime.checkpoint import CheckpointError
    from cetd.runtime.driver import Driver, WorkerLost
    from cetd.runtime.timing import cpu_seconds

    spec = from_json(JobSpec, json.dumps(launch["spec"]))
    job_id = launch["job_id"]
    checkpoint_dir = Path(launch["checkpoint_dir"])
    driver = Driver(spec)
    description = driver.describe()
    emit("described", description=json.loads(to_json(description)), cpu_seconds=cpu_seconds())
    while True:
        order = link.next()
        if order.get("stop"):
            return
        plan = from_json(JobPlan, json.dumps(order["plan"]))
        resume = _newest_intact_state(checkpoint_dir, job_id) if order.get("resume") else None
        with _channel(launch, 0, plan.world_size) as channel:
            link.attach(channel)
            emit("ready", address=channel.address, resume_step=resume.step if resume is not None else 0)
            channel.connect(_peers(link.next(), 0))

            def on_step(report: StepReport) -> None:
                emit("step", step=report.step, loss=report.loss, seconds=report.seconds, samples=report.samples)

            def on_checkpoint(manifest: Any) -> None:
                emit("checkpoint", step=manifest.step, manifest=str(manifest.path))

            try:
                result = driver.run(plan, channel, on_step, resume=resume, term=int(order.get("term", 0)), job_id=job_id,
                                    checkpoint_dir=checkpoint_dir, on_checkpoint=on_checkpoint,
                                    stop_requested=link.migrate_requested.is_set)
            except WorkerLost as lost:
                channel.abort(str(lost))  # do not wait on the lost peer when the channel closes
                emit("lost", reason=link.abort_reason or str(lost), failed_rank=lost.failed_rank,
                     last_step=lost.last_step, checkpoint_step=lost.checkpoint_step,
                     migrated=link.migrate_requested.is_set())
                continue
            except CheckpointError as error:
                channel.abort(str(error))
                emit("paused", reason=str(error))
                continue
        emit("done", seconds=result.seconds, samples=result.samples, output=result.output,
             cpu_seconds=cpu_seconds())
        return


class _TruncatingChannel:
    """Fault injection for tests (``CETD_FAULT=truncate-activations``): this worker sends every pipeline
    activation one position short, as a buggy or mismatched peer would. Never set in production."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    def send(self, peer: int, key: Any, tensor: Any) -> Any:
        if key.name == "act" and tensor.dim() >= 2:
            tensor = tensor[:, :-1].contiguous()
        return self._channel.send(peer, key, tensor)


def run_worker_process(launch: dict[str, Any], link: DaemonLink) -> None:
    from cetd.runtime.timing import cpu_seconds
    from cetd.runtime.worker import run_worker

    spec = from_json(JobSpec, json.dumps(launch["spec"]))
    plan = from_json(JobPlan, json.dumps(launch["plan"]))
    description = from_json(ModelDescription, json.dumps(launch["description"]))
    rank = int(launch["rank"])
    with _channel(launch, rank, plan.world_size) as channel:
        link.attach(channel)
        emit("ready", address=channel.address)
        channel.connect(_peers(link.next(), rank))
        if os.environ.get("CETD_FAULT") == "truncate-activations":
            channel = _TruncatingChannel(channel)
        run_worker(spec, plan, rank, description, channel, checkpoint_dir=Path(launch["checkpoint_dir"]),
                   device_id=launch["device_id"], on_training=lambda: emit("training", cpu_seconds=cpu_seconds()))
    emit("done", cpu_seconds=cpu_seconds())


def run_profile(launch: dict[str, Any], link: DaemonLink) -> None:
    """Time the launch's model at its micro-batch shape (`cetd.runtime.profiling`); without a model, one
    reference transformer block (GPT-2 small's shape, 8 × 32 tokens), forward + backward."""
    import time

    if launch.get("retime"):
        _retime(launch, link)
        return
    import torch
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    if "description" in launch:
        from cetd.runtime.profiling import profile_shape
        from cetd.runtime.worker import torch_dtype

        description = from_json(ModelDescription, json.dumps(launch["description"]))
        shape = profile_shape(description, micro_batch=int(launch["micro_batch"]), seq_len=int(launch["seq_len"]),
                              dtype=torch_dtype(str(launch.get("precision", "float32"))))
        echo = ""
        try:
            message, per_byte, echo = _profile_transport(launch, shape.cpu_share, link)
        except (CetdError, OSError, KeyError, ValueError, TransportError) as error:  # no identity here, say
            logger.warning("the transport was not profiled: %s", error)
        else:
            shape = dataclasses.replace(shape, message_seconds=message, byte_seconds=per_byte)
        emit("profiled", times=json.loads(to_json(shape)), threads=torch.get_num_threads(), echo=echo)
        return
    config = GPT2Config(n_embd=768, n_head=12, n_positions=64)
    config._attn_implementation = "eager"  # as every training stage runs it
    block = GPT2Block(config)  # type: ignore[no-untyped-call]  # transformers ships no types
    hidden = torch.randn(8, 32, 768, requires_grad=True)
    times = []
    for i in range(int(launch.get("repeats", 7))):
        started = time.perf_counter()
        out = block(hidden)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        if i >= 2:  # the first passes warm caches and the allocator
            times.append(time.perf_counter() - started)
    # The mean over the passes (≥ 0.5 s in all): the sustained rate, which a CPU quota or a throttled board
    # sets; the fastest single pass would show the unthrottled burst speed instead.
    emit("profiled", block_seconds=sum(times) / len(times) / hidden.shape[0], threads=torch.get_num_threads())


def _retime(launch: dict[str, Any], link: DaemonLink) -> None:
    """A shape's block and the transport timed again, minutes after the shape's profile: the daemon answers
    with the median of these timings (`cetd.daemon.shape_profiles`)."""
    share = float(launch.get("cpu_share", 0.0))
    event: dict[str, Any] = {}
    if "description" in launch:
        from cetd.runtime.profiling import time_block
        from cetd.runtime.worker import torch_dtype

        description = from_json(ModelDescription, json.dumps(launch["description"]))
        try:
            block, share = time_block(description, micro_batch=int(launch["micro_batch"]),
                                      seq_len=int(launch["seq_len"]),
                                      dtype=torch_dtype(str(launch.get("precision", "float32"))))
        except (KeyError, ValueError) as error:
            emit("failed", reason=f"the block was not timed again: {error}")
            return
        event["block"] = {"block_seconds": block, "cpu_share": share}
    if launch.get("transport", True):
        try:
            message, per_byte, echo = _profile_transport(launch, share, link)
        except (CetdError, OSError, KeyError, ValueError, TransportError) as error:
            emit("failed", reason=f"the transport was not profiled: {error}")
            return
        event.update(transport={"message_seconds": message, "byte_seconds": per_byte}, echo=echo)
    emit("profiled", **event)


def _profile_transport(launch: dict[str, Any], cpu_share: float, link: DaemonLink) -> tuple[float, float, str]:
    """Seconds per hop and per byte, and where the echo ran (``remote``, ``local``).

    With ``remote_echo`` (the daemon's shape profiler): ping-pong with an echo on another device that
    the daemon finds, this end's CPU over ``cpu_share`` (`near_hop_seconds`) — a job's hop has its
    other end on another device too. An echo in a second process of this device shares its CPU: on
    the study's testbed, a device at a fifth of a core spent 1.5–2.0 ms of CPU per round trip at its
    end that way and 0.8–1.2 ms against an echo outside its quota, and plans priced on the first
    over-forecast its tensor-parallel jobs by 33–73%. Without a remote echo: ping-pong with an echo in
    a second process of this device (mutual TLS on 127.0.0.1), both ends' CPU over ``cpu_share``
    (`hop_cpu_seconds`). The ping-pong's wall time where no share was measured.
    """
    from cetd.runtime.transport_profile import near_hop_seconds, profile_transport

    if launch.get("remote_echo") and launch.get("host"):
        with _channel({**launch, "job_id": "profile"}, 0, 2) as near:
            emit("transport", address=near.address)
            peer = link.next().get("echo")
            if peer:
                near.connect({1: (str(peer[0]), str(peer[1]))})
                timed = profile_transport(near, 1)
                if cpu_share <= 0:
                    return timed.hop_seconds, timed.byte_seconds, "remote"
                return (*near_hop_seconds(timed, cpu_share), "remote")
    return (*_profile_local_transport(launch, cpu_share), "local")


def _profile_local_transport(launch: dict[str, Any], cpu_share: float) -> tuple[float, float]:
    """`_profile_transport` against an echo in a second process of this device."""
    import select
    import subprocess

    from cetd.identity import tls_server_name
    from cetd.runtime.transport_profile import PhaseCost, hop_cpu_seconds, profile_transport

    identity = load_identity(StateDir(launch["state_dir"]))
    local = {**launch, "job_id": "profile", "host": "127.0.0.1"}
    name = tls_server_name(identity.device_id)

    def line(timeout: float) -> dict[str, Any]:
        assert echo.stdout is not None
        readable, _, _ = select.select([echo.stdout], [], [], timeout)
        return json.loads(echo.stdout.readline() or "{}") if readable else {}

    with _channel(local, 0, 2) as near:
        echo = subprocess.Popen([sys.executable, "-m", "cetd.daemon.worker_main"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert echo.stdin is not None
            echo.stdin.write(json.dumps({"role": "echo", "state_dir": launch["state_dir"], "threads": 1,
                                         "peer": [near.address, name]}) + "\n")
            echo.stdin.flush()
            ready = line(ECHO_TIMEOUT.total_seconds())
            if ready.get("event") != "ready":
                raise TransportError(f"the transport echo did not start: {ready.get('reason') or 'no answer'}")
            near.connect({1: (ready["address"], name)})
            timed = profile_transport(near, 1)
            echoed = line(60.0)
            if echoed.get("event") != "echoed":
                raise TransportError(f"the transport echo did not report: {echoed.get('reason') or 'no answer'}")
            echo.wait(timeout=60)
        finally:
            if echo.poll() is None:
                echo.kill()
                echo.wait()
    if cpu_share <= 0:
        return timed.hop_seconds, timed.byte_seconds
    far = {phase: PhaseCost(**cost) for phase, cost in echoed["phases"].items()}
    return hop_cpu_seconds(timed, far, cpu_share)


def run_echo(launch: dict[str, Any]) -> None:
    """The far end of the transport profile: a second process that sends every message straight back."""
    from cetd.runtime.transport_profile import echo_transport

    address, name = launch["peer"]
    local = {**launch, "job_id": "profile", "host": launch.get("host") or "127.0.0.1"}
    with _channel(local, 1, 2) as far:
        emit("ready", address=far.address)
        far.connect({0: (address, name)})
        phases = echo_transport(far, 0)
    emit("echoed", phases={phase: dataclasses.asdict(cost) for phase, cost in phases.items()})


def _die_with_the_daemon() -> None:
    """A job process must not outlive its daemon (kill -9 of the daemon included): Linux PDEATHSIG."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the daemon died before prctl took effect
            os._exit(1)


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s [worker] %(name)s: %(message)s")
    _die_with_the_daemon()
    link = DaemonLink()
    launch = link.next()
    threads = int(launch.get("threads") or 0) or (os.cpu_count() or 1)
    import torch

    torch.set_num_threads(threads)
    try:
        if launch["role"] == "driver":
            run_driver(launch, link)
        elif launch["role"] == "profile":
            run_profile(launch, link)
        elif launch["role"] == "echo":
            run_echo(launch)
        else:
            run_worker_process(launch, link)
    except TensorMismatch as error:
        # A protocol violation: re-planning elsewhere would fail the same way, so it ends the job.
        emit("failed", reason=str(error), fatal=True)
        return 1
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
