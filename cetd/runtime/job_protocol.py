"""What flows between the driver and the workers of one training job, and what each worker holds.

Both sides of a job derive everything from the same plain data (`JobSpec`, `JobPlan`, the model's
architecture), so they agree without negotiating: `build_share` cuts the very same piece of the model
on the driver (real weights, to send them) and on a worker (parameters on the meta device, to learn
their names, dtypes and shapes before receiving them). Every tensor name the job exchanges is made
here, so a typo cannot make one side wait for a tensor the other never sends.

The conversation, per job: the driver sends each worker its share's parameters and buffers; then per
a *start* record (the step training goes on from, the coordinator's term, the job ID) and, when resuming
from a checkpoint, the share's AdamW state; then per step ``s`` (1-based) a control tensor (continue /
checkpoint / stop / finish), the micro-batch tensors the worker's share reads, and gets back the step's
loss from the one worker that computes it; after a *checkpoint* step every worker also sends its shard
(a header with its size, then the safetensors bytes); after the last step a *finish* control makes every
worker send its final parameters back.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cetd.errors import JobError
from cetd.runtime.data_parallel import shard_micro_batches
from cetd.runtime.models import ModelAdapter, StageModule
from cetd.runtime.spec import DRIVER_RANK, JobPlan, WorkerAssignment
from cetd.runtime.tensor_parallel import AllReduce, ShardSpec, make_tensor_parallel_model
from cetd.transport.channel import TensorKey, TensorSpec

__all__ = [
    "CHECKPOINT_HEADER_SPEC",
    "CONTROL_SPEC",
    "LOSS_SPEC",
    "START_SPEC",
    "Control",
    "Share",
    "batch_key",
    "batch_spec",
    "buffer_key",
    "build_share",
    "check_plan",
    "checkpoint_header_key",
    "checkpoint_shard_key",
    "control_key",
    "final_parameter_key",
    "job_id_key",
    "loss_key",
    "loss_rank",
    "micro_batch_size",
    "optimizer_key",
    "parameter_key",
    "pipeline_ranks",
    "replica_count",
    "replica_gradient_key",
    "replica_loss_key",
    "stage_replica_ranks",
    "start_key",
    "tensor_parallel_key",
    "worker_ranks",
]

_SETUP_STEP = -1
"""Step number of the tensors exchanged before the first step and after the last."""

CONTROL_SPEC = TensorSpec(dtype=torch.int64, shape=(1,))
LOSS_SPEC = TensorSpec(dtype=torch.float64, shape=())
"""The step loss: the sum over micro-batches of float64(loss / M), as the reference trainer reports it."""
START_SPEC = TensorSpec(dtype=torch.int64, shape=(3,))
"""(steps already done, coordinator term, bytes of the job ID that follows)."""
CHECKPOINT_HEADER_SPEC = TensorSpec(dtype=torch.int64, shape=(2,))
"""(bytes of the shard that follows, 1 if the worker kept its own replica of it else 0)."""


class Control(enum.IntEnum):
    """What the driver tells every worker before each step."""

    STOP = 0
    """End now without sending anything (the job failed or was cancelled)."""
    CONTINUE = 1
    """Run step ``s``: its micro-batches follow."""
    FINISH = 2
    """Training is done: send the final parameters, then end."""
    CHECKPOINT = 3
    """Run step ``s`` like CONTINUE, then write this share's checkpoint shard and send it to the driver."""


def parameter_key(full_name: str) -> TensorKey:
    """A share's initial parameter, driver → worker, by the full model's canonical name."""
    return TensorKey(step=_SETUP_STEP, micro_batch=-1, name=f"job/param/{full_name}")


def buffer_key(path: str) -> TensorKey:
    """A share's buffer (position ids and the like), driver → worker, by its full module path."""
    return TensorKey(step=_SETUP_STEP, micro_batch=-1, name=f"job/buffer/{path}")


def start_key() -> TensorKey:
    """The `START_SPEC` record, driver → worker, after the share's weights."""
    return TensorKey(step=_SETUP_STEP, micro_batch=-1, name="job/start")


def job_id_key() -> TensorKey:
    """The job ID as UTF-8 bytes (uint8), driver → worker, after the start record when not empty."""
    return TensorKey(step=_SETUP_STEP, micro_batch=-1, name="job/id")


def optimizer_key(full_name: str, kind: str) -> TensorKey:
    """A resumed share's AdamW state (``exp_avg``, ``exp_avg_sq`` or ``step``), driver → worker."""
    return TensorKey(step=_SETUP_STEP, micro_batch=-1, name=f"job/optim/{kind}/{full_name}")


def checkpoint_header_key(step: int) -> TensorKey:
    """A worker's `CHECKPOINT_HEADER_SPEC` for its shard of the checkpoint after ``step``."""
    return TensorKey(step=step, micro_batch=-1, name="job/ckpt/header")


def checkpoint_shard_key(step: int) -> TensorKey:
    """A worker's shard bytes (uint8) of the checkpoint after ``step``."""
    return TensorKey(step=step, micro_batch=-1, name="job/ckpt/shard")


def final_parameter_key(full_name: str) -> TensorKey:
    """A share's trained parameter, worker → driver."""
    return TensorKey(step=_SETUP_STEP, micro_batch=-1, name=f"job/final/{full_name}")


def control_key(step: int) -> TensorKey:
    """The `Control` for step ``step`` (``steps + 1`` carries the finish)."""
    return TensorKey(step=step, micro_batch=-1, name="job/control")


def batch_key(step: int, micro_batch: int, field: str) -> TensorKey:
    """One field (``input_ids``, ``labels``…) of one micro-batch, driver → worker."""
    return TensorKey(step=step, micro_batch=micro_batch, name=f"job/batch/{field}")


def loss_key(step: int) -> TensorKey:
    """The step's loss, loss-computing worker → driver."""
    return TensorKey(step=step, micro_batch=-1, name="job/loss")


def tensor_parallel_key(step: int, call: int) -> TensorKey:
    """The ``call``-th all-reduce of a step among tensor-parallel workers."""
    return TensorKey(step=step, micro_batch=-1, name=f"tp/{call}")


def replica_loss_key(step: int) -> TensorKey:
    """The all-gather of a step's micro-batch losses among the last stages of pipeline replicas."""
    return TensorKey(step=step, micro_batch=-1, name="pipeline/replicas/loss")


def replica_gradient_key(step: int) -> TensorKey:
    """The all-reduce of one pipeline stage's gradients among its replicas."""
    return TensorKey(step=step, micro_batch=-1, name="pipeline/replicas/grad")


def micro_batch_size(global_batch: int, micro_batches: int) -> int:
    """Examples per micro-batch."""
    if micro_batches < 1 or global_batch % micro_batches:
        raise JobError(f"a batch of {global_batch} cannot be split into {micro_batches} equal micro-batches")
    return global_batch // micro_batches


def batch_spec(field: str, *, task: str, micro_batch: int, seq_len: int) -> TensorSpec:
    """What one field of a micro-batch looks like: ``(b, S)`` token ids and masks; labels ``(b,)`` when
    classifying sequences."""
    if field == "labels" and task == "sequence_classification":
        return TensorSpec(dtype=torch.int64, shape=(micro_batch,))
    return TensorSpec(dtype=torch.int64, shape=(micro_batch, seq_len))


def worker_ranks(plan: JobPlan) -> list[int]:
    """The workers' ranks in the order of their share: pipeline stage, tensor or data index."""
    return [w.rank for w in sorted(plan.workers, key=lambda w: (w.stage, w.tp_index, w.dp_index, w.rank))]


def replica_count(plan: JobPlan) -> int:
    """How many copies of the pipeline a pipeline plan runs (its distinct ``dp_index`` values); 1 otherwise."""
    return len({w.dp_index for w in plan.workers}) if plan.parallelism == "pipeline" else 1


def pipeline_ranks(plan: JobPlan, replica: int) -> list[int]:
    """The ranks of pipeline replica ``replica`` (its ``dp_index``), in stage order."""
    return [w.rank for w in sorted(plan.workers, key=lambda w: w.stage) if w.dp_index == replica]


def stage_replica_ranks(plan: JobPlan, stage: int) -> list[int]:
    """The ranks that hold pipeline stage ``stage``, one per replica, in replica order: the ranks that
    all-reduce that stage's gradients."""
    return [w.rank for w in sorted(plan.workers, key=lambda w: w.dp_index) if w.stage == stage]


def loss_rank(plan: JobPlan) -> int:
    """The one worker that sends the step loss: replica 0's last pipeline stage, else the first worker.

    With pipeline replicas every last stage knows the whole step's loss (they gather it); replica 0's
    reports it.
    """
    if plan.parallelism == "pipeline":
        return pipeline_ranks(plan, 0)[-1]
    return worker_ranks(plan)[0]


def check_plan(plan: JobPlan, *, num_blocks: int, num_heads: int, world_size: int, sync_every: int = 1) -> None:
    """Refuse a plan that the model or the channel cannot run.

    Args:
        plan: the job's plan.
        num_blocks: the model's transformer blocks.
        num_heads: its attention heads.
        world_size: ranks of the job's channel (driver included).
        sync_every: the job's ``sync_every`` (pipeline replicas need 1).

    Raises:
        JobError: naming what is wrong with the plan.
    """
    ranks = sorted(w.rank for w in plan.workers)
    count = len(ranks)
    if ranks != list(range(DRIVER_RANK + 1, DRIVER_RANK + 1 + count)) or count == 0:
        raise JobError(f"the plan's worker ranks {ranks} are not 1..N")
    if plan.world_size != world_size:
        raise JobError(f"the plan needs {plan.world_size} ranks but the job's channel has {world_size}")
    if plan.parallelism == "single" and count != 1:
        raise JobError(f"a single-device plan names {count} workers")
    if plan.parallelism == "pipeline":
        _check_replicas(plan, num_blocks, sync_every)
    if plan.parallelism == "tensor":
        if sorted(w.tp_index for w in plan.workers) != list(range(count)):
            raise JobError("the plan's tensor-parallel indices are not 0..N-1")
        if count > num_heads:
            raise JobError(f"{count} tensor-parallel workers exceed the model's {num_heads} attention heads")
        if plan.ring_min_bytes < 1:
            raise JobError(f"the plan's ring threshold of {plan.ring_min_bytes} bytes is not a size")
    if plan.parallelism == "data" and sorted(w.dp_index for w in plan.workers) != list(range(count)):
        raise JobError("the plan's data-parallel indices are not 0..N-1")


def _check_replicas(plan: JobPlan, num_blocks: int, sync_every: int) -> None:
    """R ≥ 1 copies of one valid pipeline, split alike (so each stage's gradients can be summed across)."""
    indices = sorted({w.dp_index for w in plan.workers})
    if indices != list(range(len(indices))):
        raise JobError(f"the plan's pipeline replica indices {indices} are not 0..R-1")
    chains = [sorted((w for w in plan.workers if w.dp_index == r), key=lambda w: w.stage) for r in indices]
    for chain in chains:
        _check_stages(chain, num_blocks)
    if len(chains) == 1:
        return
    first = [(w.start_block, w.end_block) for w in chains[0]]
    for replica, chain in enumerate(chains[1:], start=1):
        bounds = [(w.start_block, w.end_block) for w in chain]
        if bounds != first:
            raise JobError(
                f"pipeline replica {replica} splits the blocks as {bounds}, replica 0 as {first}; "
                "every replica must hold the same blocks on each stage"
            )
    if len(chains) > plan.micro_batches:
        raise JobError(
            f"{len(chains)} pipeline replicas need at least {len(chains)} micro-batches per step; "
            f"the plan has {plan.micro_batches}"
        )
    if sync_every != 1:
        raise JobError(f"pipeline replicas sum their gradients every step, so --sync-every must be 1, not {sync_every}")


def _check_stages(stages: Sequence[WorkerAssignment], num_blocks: int) -> None:
    if [w.stage for w in stages] != list(range(len(stages))):
        raise JobError("the plan's pipeline stages are not 0..S-1")
    expected_start = 0
    for worker in stages:
        if worker.start_block != expected_start or worker.end_block < worker.start_block:
            raise JobError(
                f"pipeline stage {worker.stage} holds blocks [{worker.start_block}, {worker.end_block}), "
                f"expected a range starting at block {expected_start}"
            )
        expected_start = worker.end_block
    if expected_start != num_blocks:
        raise JobError(f"the pipeline stages cover {expected_start} of the model's {num_blocks} blocks")


@dataclass(frozen=True, slots=True)
class Share:
    """The piece of the model one worker trains, as both driver and worker see it."""

    module: StageModule
    """The worker's stage: a pipeline range, the whole model, or a tensor-parallel shard of it."""
    micro_batches: range
    """Global indices of the micro-batches of each step this worker trains on."""
    layout: dict[str, ShardSpec] | None = None
    """How tensor-parallel parameters are cut (`gather_full_state_dict`); None for whole tensors."""

    @property
    def batch_fields(self) -> list[str]:
        """The micro-batch fields the share reads (only these are shipped to it), sorted."""
        return sorted(self.module.batch_keys)

    def parameter_specs(self) -> dict[str, TensorSpec]:
        """Full name → dtype and shape of every parameter the share holds (tied weights once)."""
        return {name: _spec(p) for name, p in self.module.named_parameters_full()}

    def buffer_specs(self) -> dict[str, TensorSpec]:
        """Full module path → dtype and shape of every buffer the share holds."""
        return {name: _spec(b) for name, b in self.module.named_buffers()}


def build_share(
    model: nn.Module,
    adapter: ModelAdapter,
    plan: JobPlan,
    rank: int,
    *,
    num_micro_batches: int,
    all_reduce: AllReduce | None = None,
) -> Share:
    """Cut worker ``rank``'s share out of ``model`` (shared modules, not a copy, except tensor parallel).

    Args:
        model: the full model (real on the driver, on the meta device on a worker).
        adapter: its adapter.
        plan: the job's plan (checked with `check_plan`).
        rank: the worker's rank.
        num_micro_batches: micro-batches per step (M).
        all_reduce: the tensor-parallel all-reduce (unused and may be None on the driver).
    """
    worker = plan.worker(rank)
    count = len(plan.workers)
    num_blocks = adapter.num_blocks(model)
    every = range(num_micro_batches)
    if plan.parallelism == "pipeline":
        replicas = replica_count(plan)
        last = worker.stage == count // replicas - 1
        stage = adapter.make_stage(model, worker.start_block, worker.end_block, first=worker.stage == 0, last=last)
        return Share(stage, shard_micro_batches(num_micro_batches, worker.dp_index, replicas))
    if plan.parallelism == "tensor":
        reduce = all_reduce if all_reduce is not None else _no_all_reduce
        parallel = make_tensor_parallel_model(model, adapter, worker.tp_index, count, reduce)
        return Share(parallel.stage, every, parallel.layout)
    whole = adapter.make_stage(model, 0, num_blocks, first=True, last=True)
    if plan.parallelism == "data":
        return Share(whole, shard_micro_batches(num_micro_batches, worker.dp_index, count))
    return Share(whole, every)


def _no_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("the driver's copy of a tensor-parallel share only ships weights; it never runs")


def _spec(tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(dtype=tensor.dtype, shape=tuple(tensor.shape))
