"""The driver of a training job: the process on the submitting device that owns data, model and output.

`Driver.describe` loads the model, its tokenizer and the data file, refusing a bad job with a one-line
reason before any device is involved, and describes the model for the planner. `Driver.run` then trains
the plan's workers over a `PeerChannel`: it sends each worker its share's weights, feeds every step the
token tensors each share reads (the data never leaves this device otherwise), collects the step losses
for the caller's progress callback, and at the end gathers the trained shares back into the full model
and writes it with ``save_pretrained``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cetd.errors import JobError
from cetd.runtime.checkpoint import CheckpointManifest
from cetd.runtime.checkpoint_state import FullState, optimizer_slices
from cetd.runtime.checkpoint_writer import CheckpointWriter
from cetd.runtime.data import TokenizedDataset, load_dataset, step_batches, tokenizer_for
from cetd.runtime.job_protocol import (
    LOSS_SPEC,
    Control,
    Share,
    batch_key,
    buffer_key,
    build_share,
    check_plan,
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
    start_key,
    worker_ranks,
)
from cetd.runtime.models import ModelAdapter, StageModule
from cetd.runtime.models.loading import load_model
from cetd.runtime.spec import DRIVER_RANK, JobPlan, JobSpec, ModelDescription, StepReport
from cetd.runtime.tensor_parallel import gather_full_state_dict
from cetd.runtime.worker import torch_dtype
from cetd.transport.channel import PeerChannel, SendHandle, TensorKey, TensorSpec, TransportError

__all__ = ["Driver", "TrainingResult", "WorkerLost", "describe_model"]

logger = logging.getLogger(__name__)

_STOP_TIMEOUT = timedelta(seconds=1)
"""Longest wait to hand one worker its stop after a failure (that worker may be the one that died)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingResult:
    """What a finished job produced."""

    losses: list[float]
    """Loss of each step (1-based step ``i`` is ``losses[i - 1]``), as the reference trainer reports it."""
    seconds: float
    """Wall time of the training, from sending the weights to writing the output."""
    samples: int
    """Examples trained on (steps times the global batch)."""
    output: str
    """Folder the trained model was written to; "" when the job asked for none."""
    first_step: int = 1
    """The first step this run trained (``checkpoint step + 1`` when resumed); ``samples`` and
    ``seconds`` count from it, ``losses`` from step 1."""


class WorkerLost(JobError, TransportError):
    """The job's run ended early: a worker failed, left or timed out, or a stop was requested.

    Both a `JobError` (a sentence for the user: which worker, the last step, the last checkpoint) and
    a `TransportError` (what callers of `Driver.run` caught before it existed). The daemon re-plans
    and runs again on a new channel from the newest complete checkpoint.
    """

    def __init__(
        self,
        message: str,
        *,
        failed_rank: int | None,
        last_step: int,
        checkpoint_step: int | None,
        requested: bool = False,
    ) -> None:
        super().__init__(message)
        self.failed_rank = failed_rank
        """Rank of the worker whose tensor did not come (the failed one, or one stalled by it); None
        when not known."""
        self.last_step = last_step
        """The last step completed (its loss reported)."""
        self.checkpoint_step = checkpoint_step
        """Step of the newest checkpoint of this run (or the one it resumed from); None when none."""
        self.requested = requested
        """True when the run stopped because ``stop_requested`` said so, not because of a failure."""


class _PeerFailed(Exception):
    """Internal: a receive from worker ``rank`` failed."""

    def __init__(self, rank: int, cause: TransportError) -> None:
        super().__init__(str(cause))
        self.rank = rank
        self.cause = cause


@dataclass(slots=True, kw_only=True)
class _Progress:
    """Where a run stands (what `WorkerLost` reports)."""

    losses: list[float]
    last_step: int
    checkpoint_step: int | None
    checkpoint_clock: float
    """`time.monotonic` of the last checkpoint (or of the start)."""


@dataclass(slots=True)
class _Loaded:
    model: nn.Module
    tokenizer: Any
    adapter: ModelAdapter
    dataset: TokenizedDataset
    description: ModelDescription


class Driver:
    """Runs one job from the submitting device (rank `DRIVER_RANK` of the job's channel)."""

    def __init__(self, spec: JobSpec, *, recv_timeout: timedelta = timedelta(minutes=10)) -> None:
        """Args:
        spec: the job.
        recv_timeout: longest wait for a step's loss or a worker's final parameter.
        """
        self.spec = spec
        self._timeout = recv_timeout.total_seconds()
        self._loaded: _Loaded | None = None
        self._resumed = False

    @property
    def model(self) -> nn.Module:
        """The driver's full model (after `run`: the trained one)."""
        return self._load().model

    def describe(self) -> ModelDescription:
        """Load model, tokenizer and data; describe the model for the planner.

        Raises:
            JobError: the model folder is missing or unusable, the data file is missing, malformed
                (the message names the line) or empty, or the sequence length exceeds the model's.
        """
        return self._load().description

    def _load(self) -> _Loaded:
        if self._loaded is not None:
            return self._loaded
        spec = self.spec
        model, pretrained, adapter = load_model(spec.model, seed=spec.seed, dtype=torch_dtype(spec.precision))
        tokenizer = tokenizer_for(pretrained, model.config)
        dataset = load_dataset(
            Path(spec.data),
            task=adapter.task,
            tokenizer=tokenizer,
            seq_len=spec.seq_len,
            max_seq_len=adapter.max_seq_len(),
        )
        self._loaded = _Loaded(model, pretrained, adapter, dataset, describe_model(model, adapter))
        logger.info("job data: %d examples of %d tokens from %s", len(dataset), spec.seq_len, spec.data)
        return self._loaded

    def run(
        self,
        plan: JobPlan,
        channel: PeerChannel,
        on_step: Callable[[StepReport], None],
        *,
        resume: FullState | None = None,
        term: int = 0,
        job_id: str = "",
        checkpoint_dir: Path | None = None,
        on_checkpoint: Callable[[CheckpointManifest], None] | None = None,
        stop_requested: Callable[[], bool] | None = None,
    ) -> TrainingResult:
        """Train ``plan``'s workers up to ``spec.steps`` steps and collect the trained model.

        Args:
            plan: who holds what; its ``micro_batches`` is the number of micro-batches per step.
            channel: this process's end of the job's channel (rank 0).
            on_step: called after every step with its report (on this thread).
            resume: the state of a checkpoint (`load_full_state`), written under any plan: every
                worker gets its share's parameters and AdamW state cut from it, and training goes on at
                step ``resume.step + 1`` with the same data; None starts from the model's weights.
            term: the coordinator's term, recorded in the checkpoints (newer terms win).
            job_id: recorded in the checkpoints; they go to ``checkpoint_dir/job_id``.
            checkpoint_dir: where checkpoints are written (after every ``spec.checkpoint_every``-th
                step, and by ``spec.checkpoint_seconds``); None writes none.
            on_checkpoint: called with each complete checkpoint's manifest.
            stop_requested: polled before each step; once true, the driver checkpoints after that step
                (or at once when the last step is already saved), stops the workers and raises
                `WorkerLost` with ``requested`` set, so the job can move to another plan.

        Returns:
            The losses (from step 1, the checkpoint's included), the time taken, where the model was written.

        Raises:
            JobError: the plan does not fit the model, the checkpoint belongs to another job, or a
                step's loss is not finite (the workers are told to stop; the message names the step).
            CheckpointError: a checkpoint could not be written (the reason, e.g. a full disk); no
                manifest was written for it and the workers were told to stop.
            WorkerLost: a worker failed, timed out or sent something unexpected, or a stop was requested.
        """
        if resume is None and self._resumed:
            self._loaded = None  # an earlier run loaded a checkpoint into the model: start from the weights again
            self._resumed = False
        loaded = self._load()
        spec = self.spec
        if channel.rank != DRIVER_RANK:
            raise ValueError(f"the driver must be rank {DRIVER_RANK}, not {channel.rank}")
        check_plan(
            plan,
            num_blocks=loaded.description.num_blocks,
            num_heads=loaded.description.num_heads,
            world_size=channel.world_size,
            sync_every=spec.sync_every,
        )
        micro_batch_size(spec.global_batch, plan.micro_batches)  # refuse a batch M does not divide
        started = time.perf_counter()
        if resume is not None:
            self._check_resume(resume)
            self._whole().load_full_state_dict(resume.parameters)
            self._resumed = True
        first = resume.step + 1 if resume is not None else 1
        shares = {
            rank: build_share(loaded.model, loaded.adapter, plan, rank, num_micro_batches=plan.micro_batches)
            for rank in worker_ranks(plan)
        }
        progress = _Progress(
            losses=list(resume.losses) if resume is not None else [],
            last_step=first - 1,
            checkpoint_step=resume.step if resume is not None else None,
            checkpoint_clock=time.monotonic(),
        )
        saver = (
            CheckpointWriter(
                spec=spec,
                plan=plan,
                directory=checkpoint_dir,
                job_id=job_id,
                term=term,
                receive=lambda rank, key, tensor_spec: self._recv(channel, rank, key, tensor_spec),
            )
            if checkpoint_dir is not None
            else None
        )
        announced = first - 1
        """The last step whose control the workers were sent: they wait for the next one."""
        try:
            self._send_shares(shares, channel)
            self._send_start(shares, channel, plan, resume, term=term, job_id=job_id)
            for step in range(first, spec.steps + 1):
                stopping = stop_requested is not None and stop_requested()
                if stopping and progress.checkpoint_step == step - 1:
                    raise self._lost(progress, None, "a stop was requested", requested=True)
                save = saver is not None and (stopping or self._checkpoint_due(step, progress))
                handles = self._send_control(channel, step, Control.CHECKPOINT if save else Control.CONTINUE, shares)
                announced = step
                self._train_step(step, plan, shares, channel, handles, progress, on_step)
                if saver is not None and save:
                    manifest = saver.save(step, progress.losses)
                    progress.checkpoint_step = step
                    progress.checkpoint_clock = time.monotonic()
                    if on_checkpoint is not None:
                        on_checkpoint(manifest)
                if stopping:
                    raise self._lost(progress, None, "a stop was requested", requested=True)
            announced = spec.steps + 1
            self._send_control(channel, announced, Control.FINISH, shares)
            self._collect(plan, shares, channel)
        except (TransportError, _PeerFailed) as error:
            if isinstance(error, WorkerLost):
                self._stop_workers(channel, announced + 1, shares)
                raise
            waited_on = error.rank if isinstance(error, _PeerFailed) else None
            cause = error.cause if isinstance(error, _PeerFailed) else error
            # The transport's own witness first (a failed group names the rank that failed it, a failed
            # send its receiver), else the worker the driver was waiting on.
            failed_rank = cause.peer if cause.peer is not None else waited_on
            if announced <= spec.steps:
                self._stop_workers(channel, announced + 1, shares)
            raise self._lost(progress, failed_rank, str(cause)) from cause
        except BaseException:
            self._stop_workers(channel, announced + 1, shares)
            raise
        output = self._write_output()
        return TrainingResult(
            losses=progress.losses,
            seconds=time.perf_counter() - started,
            samples=(spec.steps - first + 1) * spec.global_batch,
            output=output,
            first_step=first,
        )

    def _train_step(
        self,
        step: int,
        plan: JobPlan,
        shares: dict[int, Share],
        channel: PeerChannel,
        handles: list[SendHandle],
        progress: _Progress,
        on_step: Callable[[StepReport], None],
    ) -> None:
        spec = self.spec
        step_started = time.perf_counter()
        micro_batches = step_batches(
            self._load().dataset,
            step - 1,
            global_batch=spec.global_batch,
            micro_batches=plan.micro_batches,
            seed=spec.seed,
        )
        loss = self._feed_step(step, plan, shares, channel, micro_batches, handles)
        if not math.isfinite(loss):
            raise JobError(
                f"the loss is {loss} at step {step}; training stopped with the parameters of step "
                f"{step - 1} (lower the learning rate or check the data)"
            )
        progress.losses.append(loss)
        progress.last_step = step
        on_step(StepReport(step=step, loss=loss, samples=spec.global_batch, seconds=time.perf_counter() - step_started))

    def _checkpoint_due(self, step: int, progress: _Progress) -> bool:
        every, seconds = self.spec.checkpoint_every, self.spec.checkpoint_seconds
        if every > 0 and step % every == 0:
            return True
        return seconds > 0 and time.monotonic() - progress.checkpoint_clock >= seconds

    def _lost(self, progress: _Progress, rank: int | None, reason: str, *, requested: bool = False) -> WorkerLost:
        saved = f"step {progress.checkpoint_step}" if progress.checkpoint_step is not None else "none"
        what = "the job stopped on request" if requested else "a worker was lost"
        if rank is not None:
            what = f"worker rank {rank} was lost"
        return WorkerLost(
            f"{what} after step {progress.last_step} ({reason}); last checkpoint: {saved}",
            failed_rank=rank,
            last_step=progress.last_step,
            checkpoint_step=progress.checkpoint_step,
            requested=requested,
        )

    def _check_resume(self, resume: FullState) -> None:
        """Refuse a checkpoint of another job (other model, data, seed, batch or optimizer settings)."""
        saved, spec = resume.manifest.spec, self.spec
        for name in ("model", "data", "seed", "global_batch", "seq_len", "lr", "weight_decay", "precision"):
            if getattr(saved, name) != getattr(spec, name):
                raise JobError(
                    f"the checkpoint at step {resume.step} was written with {name} {getattr(saved, name)!r}, "
                    f"this job has {getattr(spec, name)!r}; it cannot be resumed from it"
                )
        if resume.step > spec.steps:
            raise JobError(f"the checkpoint is at step {resume.step}, past the job's {spec.steps} steps")

    def _whole(self) -> StageModule:
        loaded = self._load()
        return loaded.adapter.make_stage(
            loaded.model, 0, loaded.adapter.num_blocks(loaded.model), first=True, last=True
        )

    def _send_start(
        self,
        shares: dict[int, Share],
        channel: PeerChannel,
        plan: JobPlan,
        resume: FullState | None,
        *,
        term: int,
        job_id: str,
    ) -> None:
        """The start record (and job ID) to every worker; on resume, each share's AdamW state."""
        encoded = job_id.encode("utf-8")
        start = torch.tensor([resume.step if resume is not None else 0, term, len(encoded)], dtype=torch.int64)
        handles: list[SendHandle] = []
        for rank in shares:
            handles.append(channel.send(rank, start_key(), start))
            if encoded:
                handles.append(
                    channel.send(rank, job_id_key(), torch.frombuffer(bytearray(encoded), dtype=torch.uint8))
                )
        if resume is not None:
            for rank, slots in optimizer_slices(resume, plan, shares).items():
                for name, slot in slots.items():
                    handles.append(channel.send(rank, optimizer_key(name, "exp_avg"), slot.exp_avg))
                    handles.append(channel.send(rank, optimizer_key(name, "exp_avg_sq"), slot.exp_avg_sq))
                    step = slot.step.to(torch.float64).reshape(())
                    handles.append(channel.send(rank, optimizer_key(name, "step"), step))
        for handle in handles:
            handle.wait(self._timeout)

    def _send_shares(self, shares: dict[int, Share], channel: PeerChannel) -> None:
        handles: list[SendHandle] = []
        for rank, share in shares.items():
            for name, parameter in share.module.named_parameters_full():
                handles.append(channel.send(rank, parameter_key(name), parameter.detach()))
            for path, buffer in share.module.named_buffers():
                handles.append(channel.send(rank, buffer_key(path), buffer.detach()))
        for handle in handles:
            handle.wait(self._timeout)

    def _feed_step(
        self,
        step: int,
        plan: JobPlan,
        shares: dict[int, Share],
        channel: PeerChannel,
        micro_batches: list[dict[str, torch.Tensor]],
        handles: list[SendHandle],
    ) -> float:
        """Send every worker the fields of its micro-batches; wait for the step's loss."""
        for rank, share in shares.items():
            for m in share.micro_batches:
                for field in share.batch_fields:
                    handles.append(channel.send(rank, batch_key(step, m, field), micro_batches[m][field]))
        loss = float(self._recv(channel, loss_rank(plan), loss_key(step), LOSS_SPEC))
        for handle in handles:
            handle.wait(self._timeout)
        return loss

    def _send_control(
        self, channel: PeerChannel, step: int, control: Control, shares: dict[int, Share]
    ) -> list[SendHandle]:
        value = torch.tensor([int(control)], dtype=torch.int64)
        return [channel.send(rank, control_key(step), value) for rank in shares]

    def _stop_workers(self, channel: PeerChannel, step: int, shares: dict[int, Share]) -> None:
        """Tell every worker to end before ``step``; best effort, as the channel may be what failed.

        All stops go out at once and share one short deadline: a dead worker never acknowledges, and
        waiting for it would only delay the recovery (its daemon, or its absence, ends it anyway).
        """
        value = torch.tensor([int(Control.STOP)], dtype=torch.int64)
        deadline = time.monotonic() + min(self._timeout, _STOP_TIMEOUT.total_seconds())
        handles = []
        for rank in shares:
            try:
                handles.append((rank, channel.send(rank, control_key(step), value)))
            except Exception as error:  # the original failure is the one to report
                logger.warning("could not tell worker rank %d to stop: %s", rank, error)
        for rank, handle in handles:
            try:
                handle.wait(max(0.01, deadline - time.monotonic()))
            except Exception as error:
                logger.warning("could not tell worker rank %d to stop: %s", rank, error)

    def _recv(self, channel: PeerChannel, rank: int, key: TensorKey, spec: TensorSpec) -> torch.Tensor:
        """`PeerChannel.recv` from a worker; a failure names the worker (`_PeerFailed`)."""
        try:
            return channel.recv(rank, key, spec, self._timeout)
        except TransportError as error:
            raise _PeerFailed(rank, error) from error

    def _collect(self, plan: JobPlan, shares: dict[int, Share], channel: PeerChannel) -> None:
        """Receive the trained shares and load them into the driver's model."""
        ranks = worker_ranks(plan)
        pieces = {rank: self._receive_final(rank, shares[rank], channel) for rank in ranks}
        if plan.parallelism == "tensor":
            layout = shares[ranks[0]].layout or {}
            full = gather_full_state_dict([pieces[rank] for rank in ranks], layout)
        elif plan.parallelism == "data":
            full = _combine_replicas([pieces[rank] for rank in ranks])
        elif plan.parallelism == "pipeline":
            replicas = range(replica_count(plan))
            full = _combine_replicas([_merge_stages([pieces[r] for r in pipeline_ranks(plan, i)]) for i in replicas])
        else:
            full = pieces[ranks[0]]
        self._whole().load_full_state_dict(full)

    def _receive_final(self, rank: int, share: Share, channel: PeerChannel) -> dict[str, torch.Tensor]:
        return {
            name: self._recv(channel, rank, final_parameter_key(name), spec)
            for name, spec in share.parameter_specs().items()
        }

    def _write_output(self) -> str:
        """Write the trained model (and the tokenizer) with ``save_pretrained``.

        A model without tokenizer files reads bytes (`ByteTokenizer`); nothing is written for it, since
        cetd builds the same byte tokenizer from the saved config when the folder is trained again.
        """
        if not self.spec.output:
            return ""
        loaded = self._load()
        folder = Path(self.spec.output)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            model: Any = loaded.model  # a transformers PreTrainedModel
            model.save_pretrained(folder)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(folder)
        except OSError as error:
            raise JobError(f"cannot write the trained model to {folder}: {error}") from error
        logger.info("wrote the trained model to %s", folder)
        return str(folder)


def _merge_stages(stages: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One pipeline's parameters from its stages' (a weight tied across stages taken once)."""
    full: dict[str, torch.Tensor] = {}
    for piece in stages:
        for name, tensor in piece.items():
            if name in full and not torch.equal(full[name], tensor):
                logger.warning("the copies of tied weight %s differ between stages", name)
            full.setdefault(name, tensor)
    return full


def _combine_replicas(replicas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The replicas' parameters: bit-identical when gradients are all-reduced every step (data
    parallelism, pipeline replicas); averaged when local SGD (``sync_every > 1``) ended between two
    synchronisations."""
    first = replicas[0]
    if all(torch.equal(first[name], other[name]) for other in replicas[1:] for name in first):
        return first
    logger.info("averaging the parameters of %d data-parallel replicas", len(replicas))
    return {name: torch.stack([r[name] for r in replicas]).mean(dim=0) for name in first}


def describe_model(model: nn.Module, adapter: ModelAdapter) -> ModelDescription:
    """What the planner and the workers need to know of a loaded model (`ModelDescription`)."""
    block = model.get_submodule(adapter.block_path(0))
    config: Any = model.config
    return ModelDescription(
        family=str(config.model_type),
        task=adapter.task,
        num_blocks=adapter.num_blocks(model),
        hidden_size=adapter.hidden_size(),
        num_heads=adapter.num_heads(),
        max_seq_len=adapter.max_seq_len(),
        parameter_count=sum(p.numel() for p in model.parameters()),
        block_parameter_count=sum(p.numel() for p in block.parameters()),
        config=config.to_dict(),
    )
