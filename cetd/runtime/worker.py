"""A worker of a training job: trains the share of the model its plan assigns, fed by the driver.

The worker never sees the data file or the whole model. It builds the model's architecture from the
driver's `ModelDescription` on the meta device (no memory), cuts its share (`build_share`), and only
then materializes that share from the parameters and buffers the driver sends; so a device holds its
pipeline stage or tensor-parallel shard and nothing else. Each step it waits for the driver's control
tensor, receives the micro-batch fields its share reads, runs the mode's runner (pipeline schedule,
tensor-parallel or data-parallel replica), and the one worker that computes the loss sends it back.
A resumed job's driver also sends the share's AdamW state, and the worker goes on from the checkpoint's
step; after each *checkpoint* step the worker serializes its share (`encode_shard`), keeps that replica
in its own checkpoint directory and sends the same bytes to the driver.
A step whose loss is not finite is refused by the runners on every worker (parameters untouched); the
workers then wait for the driver's *stop* and end cleanly.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from cetd.errors import JobError
from cetd.runtime.checkpoint import checkpoint_folder, disk_error, prune_replicas, shard_file_name, write_file_atomic
from cetd.runtime.checkpoint_state import OptimizerSlot, ShardMeta, encode_shard, load_optimizer_state
from cetd.runtime.collectives import all_reduce_
from cetd.runtime.data_parallel import DataParallelRunner, all_reduce_gradients_, global_loss
from cetd.runtime.job_protocol import (
    CONTROL_SPEC,
    START_SPEC,
    Control,
    Share,
    batch_key,
    batch_spec,
    buffer_key,
    build_share,
    check_plan,
    checkpoint_header_key,
    checkpoint_shard_key,
    control_key,
    final_parameter_key,
    job_id_key,
    loss_key,
    loss_rank,
    micro_batch_size,
    optimizer_key,
    parameter_key,
    pipeline_ranks,
    replica_count,
    replica_gradient_key,
    replica_loss_key,
    stage_replica_ranks,
    start_key,
    tensor_parallel_key,
    worker_ranks,
)
from cetd.runtime.models import ModelAdapter, adapter_for
from cetd.runtime.models.loading import build_described
from cetd.runtime.pipeline import MicroBatch, PipelineStageRunner
from cetd.runtime.reference import AdamWSettings
from cetd.runtime.spec import DRIVER_RANK, JobPlan, JobSpec, ModelDescription, WorkerAssignment
from cetd.transport.channel import PeerChannel, SendHandle, TensorSpec

__all__ = ["THREADS_ENV", "build_meta_model", "run_worker", "torch_dtype"]

logger = logging.getLogger(__name__)

THREADS_ENV = "CETD_TORCH_THREADS"
"""Environment variable with the number of torch compute threads, when `run_worker` is given none."""


def torch_dtype(precision: str) -> torch.dtype:
    """The parameter dtype of a job's ``precision``."""
    return torch.float64 if precision == "float64" else torch.float32


def adamw_settings(spec: JobSpec) -> AdamWSettings:
    """The optimizer every worker (and the reference trainer) uses for ``spec``."""
    return AdamWSettings(lr=spec.lr, weight_decay=spec.weight_decay)


def build_meta_model(description: ModelDescription, *, dtype: torch.dtype) -> tuple[nn.Module, ModelAdapter]:
    """The described model's architecture with every parameter and buffer on the meta device.

    Attention runs the eager path and dropout is off, as `load_model` builds every model, so a share
    computes the very numbers the driver's model would. No weight is drawn: they all come from the
    driver.
    """
    model = build_described(description, dtype=dtype, meta=True)
    return model, adapter_for(model)


class _StepRunner(Protocol):
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    def run_step(self, step: int, micro_batches: Sequence[MicroBatch]) -> float | None: ...


class _TensorParallelAllReduce:
    """The all-reduce a tensor-parallel shard calls, over the channel among the tensor-parallel workers.

    Each call of a step gets the next key; every worker makes the same calls in the same order.
    """

    def __init__(self, channel: PeerChannel, ranks: Sequence[int], timeout: timedelta, ring_min_bytes: int) -> None:
        self._channel = channel
        self._ranks = list(ranks)
        self._timeout = timeout
        self._ring_min_bytes = ring_min_bytes
        self._step = 0
        self._calls = 0

    def start_step(self, step: int) -> None:
        self._step = step
        self._calls = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.detach().clone(memory_format=torch.contiguous_format)
        key = tensor_parallel_key(self._step, self._calls)
        self._calls += 1
        return all_reduce_(self._channel, total, ranks=self._ranks, key=key, timeout=self._timeout,
                           ring_min_bytes=self._ring_min_bytes)


class _LossRecorder:
    """What the loss-computing worker saw of a step's loss, to report a step the runner refused."""

    def __init__(self, module: nn.Module, num_micro_batches: int) -> None:
        self._num_micro_batches = num_micro_batches
        self._values: list[float] = []
        module.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if output.dim() == 0:
            self._values.append(float((output.detach() / self._num_micro_batches).to(torch.float64)))

    def reset(self) -> None:
        self._values.clear()

    def refused_loss(self) -> float:
        """This worker's sum when it is not finite; NaN when the non-finite part was another replica's."""
        total = sum(self._values)
        return total if not math.isfinite(total) else math.nan


def run_worker(
    spec: JobSpec,
    plan: JobPlan,
    rank: int,
    description: ModelDescription,
    channel: PeerChannel,
    *,
    num_threads: int | None = None,
    recv_timeout: timedelta = timedelta(minutes=10),
    checkpoint_dir: Path | None = None,
    device_id: str = "",
    on_training: Callable[[], None] | None = None,
) -> None:
    """Train worker ``rank``'s share of the job until the driver says finish (or stop).

    Args:
        spec: the job.
        plan: the job's plan; ``plan.worker(rank)`` is this worker's share.
        rank: this worker's rank (1..N), equal to ``channel.rank``.
        description: the model, as the driver described it.
        channel: tensor exchange with the driver (rank 0) and the other workers.
        num_threads: torch compute threads; else the ``CETD_TORCH_THREADS`` environment variable;
            else torch's default.
        recv_timeout: longest wait for one tensor (from the driver or a peer).
        checkpoint_dir: this device's checkpoint directory, where the worker keeps a replica of every
            checkpoint shard it sends (``<dir>/<job>/step-…/shard-rank<r>.safetensors``, the very bytes
            the driver stores); None keeps no replica.
        device_id: this device's ID, recorded in the shards (defaults to the plan's).
        on_training: called once the share is built and loaded, just before the first step (the daemon
            counts the CPU and energy before it as start-up, apart from the job's J/sample).

    Raises:
        JobError: the plan does not fit the model, or the driver sent an unknown control value.
        TransportError: a peer sent something unexpected, failed or timed out.
    """
    if channel.rank != rank:
        raise ValueError(f"worker rank {rank} was given the channel of rank {channel.rank}")
    _set_threads(num_threads)
    model, adapter = build_meta_model(description, dtype=torch_dtype(spec.precision))
    check_plan(
        plan,
        num_blocks=adapter.num_blocks(model),
        num_heads=adapter.num_heads(),
        world_size=channel.world_size,
        sync_every=spec.sync_every,
    )
    num_micro_batches = plan.micro_batches
    size = micro_batch_size(spec.global_batch, num_micro_batches)
    all_reduce = (
        _TensorParallelAllReduce(channel, worker_ranks(plan), recv_timeout, plan.ring_min_bytes)
        if plan.parallelism == "tensor"
        else None
    )
    share = build_share(model, adapter, plan, rank, num_micro_batches=num_micro_batches, all_reduce=all_reduce)
    _receive_share(share, channel, recv_timeout)
    del model  # only the share's modules stay referenced
    timeout = recv_timeout.total_seconds()
    start = _receive_start(channel, timeout)
    runner = _make_runner(spec, plan, share, adapter, channel, size=size, timeout=recv_timeout)
    if start.step > 0:
        _receive_optimizer_state(share, runner.optimizer, channel, timeout)
    keeper = _ShardKeeper(
        share, runner.optimizer, plan.worker(rank), start, checkpoint_dir, device_id, keep=spec.keep_checkpoints
    )
    reports_loss = rank == loss_rank(plan)
    recorder = _LossRecorder(share.module, num_micro_batches) if reports_loss else None
    fields = share.batch_fields
    if on_training is not None:
        on_training()
    for step in itertools.count(start.step + 1):
        control = _control(channel.recv(DRIVER_RANK, control_key(step), CONTROL_SPEC, timeout))
        if control is Control.STOP:
            logger.info("rank %d: stopped by the driver before step %d", rank, step)
            return
        if control is Control.FINISH:
            _send_final_parameters(share, channel, timeout)
            logger.info("rank %d: finished after %d steps", rank, step - 1)
            return
        micro_batches = [
            {
                field: channel.recv(
                    DRIVER_RANK,
                    batch_key(step, m, field),
                    batch_spec(field, task=adapter.task, micro_batch=size, seq_len=spec.seq_len),
                    timeout,
                )
                for field in fields
            }
            for m in share.micro_batches
        ]
        if all_reduce is not None:
            all_reduce.start_step(step)
        if recorder is not None:
            recorder.reset()
        loss: float | None
        refused = False
        try:
            loss = runner.run_step(step, micro_batches)
        except JobError as error:
            logger.warning("rank %d: %s", rank, error)
            loss = recorder.refused_loss() if recorder is not None else None
            refused = True
        if reports_loss:
            if loss is None:
                raise RuntimeError(f"rank {rank} computes the loss but its runner returned none")
            channel.send(DRIVER_RANK, loss_key(step), torch.tensor(loss, dtype=torch.float64)).wait(timeout)
        if control is Control.CHECKPOINT and not refused:  # a refused step ends the job: nothing to save
            keeper.checkpoint(step, channel, timeout)
    raise AssertionError("unreachable")  # itertools.count never ends


@dataclass(frozen=True, slots=True)
class _Start:
    step: int
    """Steps already done (0 for a fresh job)."""
    term: int
    job_id: str


def _receive_start(channel: PeerChannel, timeout: float) -> _Start:
    record = channel.recv(DRIVER_RANK, start_key(), START_SPEC, timeout)
    step, term, length = (int(value) for value in record)
    job_id = ""
    if length > 0:
        raw = channel.recv(DRIVER_RANK, job_id_key(), TensorSpec(dtype=torch.uint8, shape=(length,)), timeout)
        job_id = bytes(raw.numpy().tobytes()).decode("utf-8")
    return _Start(step, term, job_id)


def _receive_optimizer_state(
    share: Share, optimizer: torch.optim.Optimizer, channel: PeerChannel, timeout: float
) -> None:
    """Receive the resumed share's AdamW state (every parameter, in `named_parameters_full` order)."""
    slots = {}
    step_spec = TensorSpec(dtype=torch.float64, shape=())
    for name, spec in share.parameter_specs().items():
        slots[name] = OptimizerSlot(
            channel.recv(DRIVER_RANK, optimizer_key(name, "exp_avg"), spec, timeout),
            channel.recv(DRIVER_RANK, optimizer_key(name, "exp_avg_sq"), spec, timeout),
            channel.recv(DRIVER_RANK, optimizer_key(name, "step"), step_spec, timeout),
        )
    load_optimizer_state(optimizer, share.module.named_parameters_full(), slots)


class _ShardKeeper:
    """Writes this worker's checkpoint shards: a local replica (when it has a directory) and the driver's copy."""

    def __init__(
        self,
        share: Share,
        optimizer: torch.optim.Optimizer,
        worker: WorkerAssignment,
        start: _Start,
        directory: Path | None,
        device_id: str,
        *,
        keep: int,
    ) -> None:
        self._share = share
        self._optimizer = optimizer
        self._worker = worker
        self._start = start
        self._directory = directory
        self._device_id = device_id or worker.device_id
        self._keep = keep

    def checkpoint(self, step: int, channel: PeerChannel, timeout: float) -> None:
        """Serialize the share after ``step``, keep a replica, send the same bytes to the driver."""
        meta = ShardMeta.for_worker(self._worker, step=step, layout=self._share.layout)
        meta = dataclasses.replace(meta, device_id=self._device_id)
        data = encode_shard(self._share.module.named_parameters_full(), self._optimizer, meta)
        kept = self._keep_replica(step, data)
        header = torch.tensor([len(data), int(kept)], dtype=torch.int64)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        handles = [
            channel.send(DRIVER_RANK, checkpoint_header_key(step), header),
            channel.send(DRIVER_RANK, checkpoint_shard_key(step), payload),
        ]
        for handle in handles:
            handle.wait(timeout)

    def _keep_replica(self, step: int, data: bytes) -> bool:
        if self._directory is None:
            return False
        folder = checkpoint_folder(self._directory, self._start.job_id, step=step, term=self._start.term)
        path = folder / shard_file_name(self._worker.rank)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_file_atomic(path, data)
        except OSError as error:
            # The driver still gets its copy; the checkpoint is only less redundant.
            logger.warning("rank %d: %s", self._worker.rank, disk_error(step, error, path))
            return False
        prune_replicas(self._directory, self._start.job_id, keep=self._keep)
        return True


def _set_threads(num_threads: int | None) -> None:
    if num_threads is None:
        configured = os.environ.get(THREADS_ENV, "").strip()
        if not configured:
            return
        try:
            num_threads = int(configured)
        except ValueError as error:
            raise JobError(f"{THREADS_ENV}={configured!r} is not a number of threads") from error
    if num_threads < 1:
        raise JobError(f"a worker needs at least one compute thread, not {num_threads}")
    torch.set_num_threads(num_threads)


def _control(tensor: torch.Tensor) -> Control:
    value = int(tensor[0])
    try:
        return Control(value)
    except ValueError:
        raise JobError(f"the driver sent an unknown control value {value}") from None


def _receive_share(share: Share, channel: PeerChannel, timeout: timedelta) -> None:
    """Replace the share's meta parameters and buffers with the driver's tensors (tied weights stay tied)."""
    seconds = timeout.total_seconds()
    real: dict[int, torch.Tensor] = {}
    for name, parameter in share.module.named_parameters_full():
        spec = TensorSpec(dtype=parameter.dtype, shape=tuple(parameter.shape))
        tensor = channel.recv(DRIVER_RANK, parameter_key(name), spec, seconds)
        real[id(parameter)] = nn.Parameter(tensor, requires_grad=parameter.requires_grad)
    for path, buffer in share.module.named_buffers():
        spec = TensorSpec(dtype=buffer.dtype, shape=tuple(buffer.shape))
        real[id(buffer)] = channel.recv(DRIVER_RANK, buffer_key(path), spec, seconds)
    for module in share.module.modules():
        for slots in (module._parameters, module._buffers):
            for name, value in slots.items():
                if value is not None and id(value) in real:
                    slots[name] = real[id(value)]  # type: ignore[assignment]  # a Parameter into _parameters
    leftover = [name for name, p in share.module.named_parameters() if p.is_meta]
    if leftover:
        raise JobError(f"the driver sent no weights for {', '.join(leftover[:3])}")


def _make_runner(
    spec: JobSpec,
    plan: JobPlan,
    share: Share,
    adapter: ModelAdapter,
    channel: PeerChannel,
    *,
    size: int,
    timeout: timedelta,
) -> _StepRunner:
    settings = adamw_settings(spec)
    if plan.parallelism == "pipeline":
        return _pipeline_runner(spec, plan, share, adapter, channel, size=size, timeout=timeout)
    # Data parallel: the replicas; single and tensor parallel: one "replica" each (every tensor-parallel
    # rank computes the whole loss), so its all-reduce of gradients is a no-op.
    replicas = worker_ranks(plan) if plan.parallelism == "data" else [channel.rank]
    return DataParallelRunner(
        share.module,
        channel,
        ranks=replicas,
        num_micro_batches=plan.micro_batches,
        optimizer=settings,
        sync_every=spec.sync_every if plan.parallelism == "data" else 1,
        sync_initial_parameters=False,  # the driver sent every replica the same weights
        timeout=timeout,
    )


def _pipeline_runner(
    spec: JobSpec,
    plan: JobPlan,
    share: Share,
    adapter: ModelAdapter,
    channel: PeerChannel,
    *,
    size: int,
    timeout: timedelta,
) -> PipelineStageRunner:
    """This worker's stage of its pipeline replica; with several replicas, hooked to the other replicas.

    Every replica scales its losses by 1/M of the whole batch; the last stages gather the step's loss
    in global micro-batch order, and after the tied weights are summed within each replica, each
    stage's gradients are summed across the replicas of that stage: together that is one device's
    gradient on the whole batch, and every replica takes the same AdamW step.
    """
    worker = plan.worker(channel.rank)
    dtype, shape = adapter.hidden_spec(size, spec.seq_len)
    replicas = replica_count(plan)
    gather: Callable[[int, list[float]], float] | None = None
    all_reduce: Callable[[int], None] | None = None
    if replicas > 1:
        last_stages = [pipeline_ranks(plan, replica)[-1] for replica in range(replicas)]
        peers = stage_replica_ranks(plan, worker.stage)
        parameters = list(share.module.parameters())

        def gather(step: int, losses: list[float]) -> float:
            return global_loss(
                channel,
                losses,
                ranks=last_stages,
                num_micro_batches=plan.micro_batches,
                key=replica_loss_key(step),
                timeout=timeout,
            )

        def all_reduce(step: int) -> None:
            all_reduce_gradients_(channel, parameters, ranks=peers, key=replica_gradient_key(step), timeout=timeout)

    return PipelineStageRunner(
        share.module,
        channel,
        stage_index=worker.stage,
        stage_ranks=pipeline_ranks(plan, worker.dp_index),
        schedule=plan.schedule,
        num_micro_batches=len(share.micro_batches),
        hidden_spec=TensorSpec(dtype=dtype, shape=shape),
        optimizer=adamw_settings(spec),
        recv_timeout=timeout,
        before_optimizer_step=all_reduce,
        loss_scale_count=plan.micro_batches,
        global_loss=gather,
    )


def _send_final_parameters(share: Share, channel: PeerChannel, timeout: float) -> None:
    handles: list[SendHandle] = [
        channel.send(DRIVER_RANK, final_parameter_key(name), parameter.detach())
        for name, parameter in share.module.named_parameters_full()
    ]
    for handle in handles:
        handle.wait(timeout)
