"""Pipeline parallelism: one worker runs one stage of the model and trains it in step with the others.

`PipelineStageRunner.run_step` executes its stage's part of a schedule (`cetd.runtime.schedules`) for
one optimizer step: it receives activations from the previous stage, sends its own to the next, and
sends the gradient with respect to its input back; all of it through `PeerChannel`, with each send
overlapping the next computation. Every micro-batch's loss is scaled by 1/M before its backward, so the
accumulated gradients equal single-device training on the whole batch with the same micro-batching
(``(loss_m / M).backward()`` for m = 0..M-1, then one AdamW step). A weight tied across the first and
last stage (GPT-2's embedding / LM head) has its gradient summed between those two stages; a step whose
loss is not finite is refused on every stage before any parameter changes.

Pipeline × data (several copies of the same pipeline): each copy runs the schedule over its own share of
the micro-batches but scales every loss by 1/M of the *whole* batch (``loss_scale_count``); the caller's
hooks gather the last stages' losses across copies (``global_loss``) and sum each stage's gradients
across copies (``before_optimizer_step``), so the copies together still equal one device on the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Protocol

import torch
from torch import nn

from cetd.errors import JobError
from cetd.runtime.collectives import all_reduce_coalesced_, broadcast_
from cetd.runtime.reference import AdamWSettings, build_adamw
from cetd.runtime.schedules import ActionKind, ScheduleName, build_schedule
from cetd.transport.channel import PeerChannel, SendHandle, TensorKey, TensorSpec

__all__ = [
    "HiddenSpec",
    "MicroBatch",
    "OptimizerConfig",
    "PipelineStage",
    "PipelineStageRunner",
    "check_finite_loss",
]

MicroBatch = Mapping[str, torch.Tensor]

HiddenSpec = TensorSpec | Callable[[MicroBatch], TensorSpec]
"""The activations a stage receives: fixed, or computed from the micro-batch (batch size, length)."""


class PipelineStage(Protocol):
    """A contiguous range of a model that a pipeline worker trains (`cetd.runtime.models.StageModule`).

    Why a protocol: the runner depends only on this much of a stage, so it is tested with toy stages
    and any model family's adapter plugs in.
    """

    @property
    def is_first(self) -> bool:
        """The stage embeds the raw micro-batch (its ``hidden`` input is None)."""

    @property
    def is_last(self) -> bool:
        """The stage returns the scalar mean loss of the micro-batch instead of activations."""

    def __call__(self, hidden: torch.Tensor | None, batch: MicroBatch) -> torch.Tensor:
        """Activations for the next stage, or the micro-batch's mean loss on the last stage."""

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Every parameter this stage trains."""

    def tied_parameters(self) -> Mapping[str, nn.Parameter]:
        """Parameters also held by another stage, by full name; their gradients are summed across."""


OptimizerConfig = AdamWSettings
"""AdamW hyperparameters (lr, betas, eps, weight_decay): the very settings the reference trainer takes."""


def check_finite_loss(step: int, loss: float) -> None:
    """Refuse a step whose loss is NaN or infinite.

    Raises:
        JobError: naming the step and the loss.
    """
    if not math.isfinite(loss):
        raise JobError(
            f"step {step}: the loss is {loss}; the step was refused and the parameters were left unchanged "
            "(lower the learning rate or check the data)"
        )


class PipelineStageRunner:
    """Trains one pipeline stage on this worker, in lockstep with the workers of the other stages."""

    def __init__(
        self,
        stage: PipelineStage,
        channel: PeerChannel,
        *,
        stage_index: int,
        stage_ranks: Sequence[int],
        schedule: ScheduleName,
        num_micro_batches: int,
        hidden_spec: HiddenSpec,
        optimizer: OptimizerConfig,
        recv_timeout: timedelta | None = timedelta(minutes=10),
        before_optimizer_step: Callable[[int], None] | None = None,
        loss_scale_count: int | None = None,
        global_loss: Callable[[int, list[float]], float] | None = None,
    ) -> None:
        """Args:
        stage: this worker's part of the model.
        channel: tensor exchange with the other workers.
        stage_index: position of ``stage`` in the pipeline, 0-based.
        stage_ranks: the channel rank that runs each stage, in pipeline order.
        schedule: "gpipe" or "1f1b".
        num_micro_batches: micro-batches this pipeline runs per optimizer step (its share when replicated).
        hidden_spec: shape and dtype of the activations this stage receives (unused on the first).
        optimizer: AdamW hyperparameters.
        recv_timeout: longest wait for one tensor from a neighbour.
        before_optimizer_step: called with the step once gradients are complete (tied weights summed),
            before AdamW (e.g. a data-parallel gradient all-reduce among replicas of this stage).
        loss_scale_count: the M that every micro-batch loss is divided by: the whole batch's micro-batches
            when pipeline replicas share it; None means ``num_micro_batches``.
        global_loss: called on the last stage with the step and its micro-batches' scaled losses (in
            order); returns the step's loss over every replica (e.g. gathered from the other replicas'
            last stages). None: the sum of this pipeline's own.
        """
        if num_micro_batches < 1 or (loss_scale_count is not None and loss_scale_count < num_micro_batches):
            raise ValueError(
                f"need 1 <= num_micro_batches <= loss_scale_count, not {num_micro_batches}, {loss_scale_count}"
            )
        count = len(stage_ranks)
        if len(set(stage_ranks)) != count:
            raise ValueError(f"stage ranks {list(stage_ranks)} must be distinct")
        if not 0 <= stage_index < count or stage_ranks[stage_index] != channel.rank:
            raise ValueError(
                f"stage {stage_index} of ranks {list(stage_ranks)} is not run by this rank ({channel.rank})"
            )
        if stage.is_first != (stage_index == 0) or stage.is_last != (stage_index == count - 1):
            raise ValueError(
                f"stage {stage_index} of {count} has is_first={stage.is_first} and is_last={stage.is_last}"
            )
        self._stage = stage
        self._channel = channel
        self._stage_index = stage_index
        self._stage_ranks = list(stage_ranks)
        self._num_micro_batches = num_micro_batches
        self._loss_scale_count = loss_scale_count if loss_scale_count is not None else num_micro_batches
        self._global_loss = global_loss
        self._actions = build_schedule(schedule, count, num_micro_batches)[stage_index]
        self._hidden_spec = hidden_spec
        self._timeout = recv_timeout
        self._before_optimizer_step = before_optimizer_step
        self._parameters = list(stage.parameters())
        self.optimizer = build_adamw(self._parameters, optimizer)
        """The stage's AdamW (its state is what a checkpoint saves)."""

    def run_step(self, step: int, micro_batches: Sequence[MicroBatch]) -> float | None:
        """Run one optimizer step over ``micro_batches`` (this pipeline's; each stage reads its keys).

        Returns:
            On the last stage the step's loss (the sum of every micro-batch's loss / M, over all
            replicas when ``global_loss`` gathers them); None on the others.

        Raises:
            JobError: the loss is not finite (on every stage; no parameter has changed).
            TransportError: a neighbour sent something unexpected, failed or timed out.
        """
        if len(micro_batches) != self._num_micro_batches:
            raise ValueError(f"step {step} got {len(micro_batches)} micro-batches, expected {self._num_micro_batches}")
        try:
            losses = self._run_schedule(step, micro_batches)
            mean_loss = self._agree_on_loss(step, losses)
            check_finite_loss(step, mean_loss)
            self._sum_tied_gradients(step)
            if self._before_optimizer_step is not None:
                self._before_optimizer_step(step)
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        return mean_loss if self._stage.is_last else None

    def _run_schedule(self, step: int, micro_batches: Sequence[MicroBatch]) -> list[float]:
        stage = self._stage
        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        losses: list[float] = []
        handles: list[SendHandle] = []
        for action in self._actions:
            m = action.micro_batch
            if action.kind is ActionKind.FORWARD:
                hidden: torch.Tensor | None = None
                if not stage.is_first:
                    hidden = self._recv(
                        self._previous_rank,
                        TensorKey(step=step, micro_batch=m, name="act"),
                        self._input_spec(micro_batches[m]),
                    )
                    hidden.requires_grad_(True)
                    inputs[m] = hidden
                out = stage(hidden, micro_batches[m])
                outputs[m] = out
                if stage.is_last:
                    if out.dim() != 0:
                        raise ValueError(f"the last stage must return a scalar loss, not shape {list(out.shape)}")
                    # Scaled here, as the reference does, so the reported mean matches it bit for bit.
                    outputs[m] = out / self._loss_scale_count
                    losses.append(float(outputs[m].detach().to(torch.float64)))
                else:
                    key = TensorKey(step=step, micro_batch=m, name="act")
                    handles.append(self._channel.send(self._next_rank, key, out.detach()))
            else:
                out = outputs.pop(m)
                if stage.is_last:
                    torch.autograd.backward(out)
                else:
                    spec = TensorSpec(dtype=out.dtype, shape=tuple(out.shape))
                    grad = self._recv(self._next_rank, TensorKey(step=step, micro_batch=m, name="grad"), spec)
                    torch.autograd.backward(out, grad_tensors=grad)
                if not stage.is_first:
                    received = inputs.pop(m)
                    input_grad = received.grad if received.grad is not None else torch.zeros_like(received)
                    key = TensorKey(step=step, micro_batch=m, name="grad")
                    handles.append(self._channel.send(self._previous_rank, key, input_grad))
        for handle in handles:
            handle.wait(_seconds(self._timeout))
        return losses

    def _agree_on_loss(self, step: int, losses: list[float]) -> float:
        """The last stage's step loss, made known to every stage so that all refuse a bad step alike."""
        mean = math.nan
        if self._stage.is_last:
            mean = self._global_loss(step, losses) if self._global_loss is not None else sum(losses)
        if len(self._stage_ranks) == 1:
            return mean
        verdict = torch.tensor([mean], dtype=torch.float64)
        key = TensorKey(step=step, micro_batch=-1, name="pipeline/loss")
        broadcast_(
            self._channel,
            verdict,
            root=self._stage_ranks[-1],
            ranks=self._stage_ranks,
            key=key,
            timeout=self._timeout,
        )
        return float(verdict[0])

    def _sum_tied_gradients(self, step: int) -> None:
        if len(self._stage_ranks) == 1 or not (self._stage.is_first or self._stage.is_last):
            return
        tied = self._stage.tied_parameters()
        if not tied:
            return
        grads = []
        for name in sorted(tied):
            parameter = tied[name]
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            grads.append(parameter.grad)
        key = TensorKey(step=step, micro_batch=-1, name="pipeline/tied")
        all_reduce_coalesced_(
            self._channel,
            grads,
            ranks=[self._stage_ranks[0], self._stage_ranks[-1]],
            key=key,
            timeout=self._timeout,
        )

    def _input_spec(self, batch: MicroBatch) -> TensorSpec:
        return self._hidden_spec if isinstance(self._hidden_spec, TensorSpec) else self._hidden_spec(batch)

    def _recv(self, peer: int, key: TensorKey, spec: TensorSpec) -> torch.Tensor:
        return self._channel.recv(peer, key, spec, _seconds(self._timeout))

    @property
    def _previous_rank(self) -> int:
        return self._stage_ranks[self._stage_index - 1]

    @property
    def _next_rank(self) -> int:
        return self._stage_ranks[self._stage_index + 1]


def _seconds(timeout: timedelta | None) -> float | None:
    return None if timeout is None else timeout.total_seconds()
