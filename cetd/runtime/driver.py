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
    loss_key,
    loss_rank,
    micro_batch_size,
    parameter_key,
    worker_ranks,
)
from cetd.runtime.models import ModelAdapter
from cetd.runtime.models.loading import load_model
from cetd.runtime.spec import DRIVER_RANK, JobPlan, JobSpec, ModelDescription, StepReport
from cetd.runtime.tensor_parallel import gather_full_state_dict
from cetd.runtime.worker import torch_dtype
from cetd.transport.channel import PeerChannel, SendHandle

__all__ = ["Driver", "TrainingResult"]

logger = logging.getLogger(__name__)


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
        self._loaded = _Loaded(model, pretrained, adapter, dataset, _describe(model, adapter))
        logger.info("job data: %d examples of %d tokens from %s", len(dataset), spec.seq_len, spec.data)
        return self._loaded

    def run(self, plan: JobPlan, channel: PeerChannel, on_step: Callable[[StepReport], None]) -> TrainingResult:
        """Train ``plan``'s workers for ``spec.steps`` steps and collect the trained model.

        Args:
            plan: who holds what; its ``micro_batches`` is the number of micro-batches per step.
            channel: this process's end of the job's channel (rank 0).
            on_step: called after every step with its report (on this thread).

        Returns:
            The losses, the time taken and where the model was written.

        Raises:
            JobError: the plan does not fit the model, or a step's loss is not finite (the workers are
                told to stop; the message names the step).
            TransportError: a worker sent something unexpected, failed or timed out.
        """
        loaded = self._load()
        spec = self.spec
        if channel.rank != DRIVER_RANK:
            raise ValueError(f"the driver must be rank {DRIVER_RANK}, not {channel.rank}")
        check_plan(
            plan,
            num_blocks=loaded.description.num_blocks,
            num_heads=loaded.description.num_heads,
            world_size=channel.world_size,
        )
        micro_batch_size(spec.global_batch, plan.micro_batches)  # refuse a batch M does not divide
        started = time.perf_counter()
        shares = {
            rank: build_share(loaded.model, loaded.adapter, plan, rank, num_micro_batches=plan.micro_batches)
            for rank in worker_ranks(plan)
        }
        self._send_shares(shares, channel)
        losses: list[float] = []
        announced = 0
        """The last step whose control the workers were sent: they wait for the next one."""
        try:
            for step in range(1, spec.steps + 1):
                step_started = time.perf_counter()
                micro_batches = step_batches(
                    loaded.dataset,
                    step - 1,
                    global_batch=spec.global_batch,
                    micro_batches=plan.micro_batches,
                    seed=spec.seed,
                )
                handles = self._send_control(channel, step, Control.CONTINUE, shares)
                announced = step
                loss = self._feed_step(step, plan, shares, channel, micro_batches, handles)
                if not math.isfinite(loss):
                    raise JobError(
                        f"the loss is {loss} at step {step}; training stopped with the parameters of step "
                        f"{step - 1} (lower the learning rate or check the data)"
                    )
                losses.append(loss)
                on_step(
                    StepReport(
                        step=step, loss=loss, samples=spec.global_batch, seconds=time.perf_counter() - step_started
                    )
                )
            announced = spec.steps + 1
            self._send_control(channel, announced, Control.FINISH, shares)
        except BaseException:
            self._stop_workers(channel, announced + 1, shares)
            raise
        self._collect(plan, shares, channel)
        output = self._write_output()
        return TrainingResult(
            losses=losses,
            seconds=time.perf_counter() - started,
            samples=spec.steps * spec.global_batch,
            output=output,
        )

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
        loss = float(channel.recv(loss_rank(plan), loss_key(step), LOSS_SPEC, self._timeout))
        for handle in handles:
            handle.wait(self._timeout)
        return loss

    def _send_control(
        self, channel: PeerChannel, step: int, control: Control, shares: dict[int, Share]
    ) -> list[SendHandle]:
        value = torch.tensor([int(control)], dtype=torch.int64)
        return [channel.send(rank, control_key(step), value) for rank in shares]

    def _stop_workers(self, channel: PeerChannel, step: int, shares: dict[int, Share]) -> None:
        """Tell every worker to end before ``step``; best effort, as the channel may be what failed."""
        try:
            for handle in self._send_control(channel, step, Control.STOP, shares):
                handle.wait(self._timeout)
        except Exception as error:  # the original failure is the one to report
            logger.warning("could not tell the workers to stop: %s", error)

    def _collect(self, plan: JobPlan, shares: dict[int, Share], channel: PeerChannel) -> None:
        """Receive the trained shares and load them into the driver's model."""
        ranks = worker_ranks(plan)
        pieces = {rank: self._receive_final(rank, shares[rank], channel) for rank in ranks}
        if plan.parallelism == "tensor":
            layout = shares[ranks[0]].layout or {}
            full = gather_full_state_dict([pieces[rank] for rank in ranks], layout)
        elif plan.parallelism == "data":
            full = _combine_replicas([pieces[rank] for rank in ranks])
        else:
            full = {}
            for rank in ranks:
                for name, tensor in pieces[rank].items():
                    if name in full and not torch.equal(full[name], tensor):
                        logger.warning("the copies of tied weight %s differ between stages", name)
                    full.setdefault(name, tensor)
        loaded = self._load()
        whole = loaded.adapter.make_stage(
            loaded.model, 0, loaded.adapter.num_blocks(loaded.model), first=True, last=True
        )
        whole.load_full_state_dict(full)

    def _receive_final(self, rank: int, share: Share, channel: PeerChannel) -> dict[str, torch.Tensor]:
        return {
            name: channel.recv(rank, final_parameter_key(name), spec, self._timeout)
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


def _combine_replicas(replicas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The replicas' parameters: bit-identical when gradients are all-reduced every step; averaged when
    local SGD (``sync_every > 1``) ended between two synchronisations."""
    first = replicas[0]
    if all(torch.equal(first[name], other[name]) for other in replicas[1:] for name in first):
        return first
    logger.info("averaging the parameters of %d data-parallel replicas", len(replicas))
    return {name: torch.stack([r[name] for r in replicas]).mean(dim=0) for name in first}


def _describe(model: nn.Module, adapter: ModelAdapter) -> ModelDescription:
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
