"""Data parallelism: every worker holds the whole model and trains on its share of the batch.

The M micro-batches of a global batch are split into contiguous shares, one per rank (the first
``M mod n`` ranks take one extra). Each rank scales every micro-batch loss by 1/M, the *global* count,
so the sum of all ranks' gradients — a bucketed, deterministic all-reduce — is exactly the gradient of
the mean loss over the whole batch, for even and uneven shares alike; then every rank takes the same
AdamW step and the replicas stay bit-identical. With ``sync_every=1`` this equals single-device
training with the same micro-batching up to the order in which micro-batch gradients are added (about
1e-16 relative per step in float64).

``sync_every=k > 1`` is local SGD, the paper's setting of one synchronisation every 5 iterations: each
replica steps on its own share (its loss scaled by 1/its share) with its own AdamW state, and the
replicas' *parameters* are averaged every k steps (optimizer states are not). That trades convergence
for bandwidth: it is NOT equivalent to single-device training, and no test claims it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
from torch import nn

from cetd.runtime.collectives import (
    DEFAULT_BUCKET_BYTES,
    all_gather,
    all_reduce_coalesced_,
    broadcast_coalesced_,
)
from cetd.runtime.pipeline import MicroBatch, OptimizerConfig, PipelineStage, check_finite_loss
from cetd.runtime.reference import build_adamw
from cetd.transport.channel import PeerChannel, TensorKey

__all__ = ["DataParallelRunner", "all_reduce_gradients_", "global_loss", "shard_micro_batches"]


def shard_micro_batches(num_micro_batches: int, index: int, world: int) -> range:
    """Global indices of the micro-batches that the ``index``-th of ``world`` replicas trains on."""
    if not 0 <= index < world:
        raise ValueError(f"replica {index} is outside 0..{world - 1}")
    base, extra = divmod(num_micro_batches, world)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def all_reduce_gradients_(
    channel: PeerChannel,
    parameters: Sequence[nn.Parameter],
    *,
    ranks: Sequence[int],
    key: TensorKey,
    divide_by: int = 1,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    timeout: timedelta | None = None,
) -> None:
    """Sum (then divide by ``divide_by``) the gradients of ``parameters`` across the replicas in ``ranks``.

    A parameter without a gradient takes part with zeros, so that every rank reduces the same buffers.
    Usable as a pipeline stage's ``before_optimizer_step`` to combine pipeline and data parallelism.
    """
    grads = []
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        grads.append(parameter.grad)
    all_reduce_coalesced_(channel, grads, ranks=ranks, key=key, bucket_bytes=bucket_bytes, timeout=timeout)
    if divide_by != 1:
        for grad in grads:
            grad.div_(divide_by)


def global_loss(
    channel: PeerChannel,
    local_losses: Sequence[float],
    *,
    ranks: Sequence[int],
    num_micro_batches: int,
    key: TensorKey,
    timeout: timedelta | None = None,
) -> float:
    """The step's loss over every replica: their micro-batches' scaled losses added in global order.

    ``ranks[i]`` holds the losses of the micro-batches ``shard_micro_batches(num_micro_batches, i,
    len(ranks))``; each rank passes its own, and all get the same sum, added exactly as the reference
    trainer adds them (micro-batch 0 first).
    """
    if len(ranks) == 1:
        return sum(local_losses)
    width = len(shard_micro_batches(num_micro_batches, 0, len(ranks)))
    padded = torch.zeros(width, dtype=torch.float64)
    padded[: len(local_losses)] = torch.tensor(list(local_losses), dtype=torch.float64)
    gathered = all_gather(channel, padded, ranks=ranks, key=key, timeout=timeout)
    ordered: list[float] = []
    for index, values in enumerate(gathered):
        share = len(shard_micro_batches(num_micro_batches, index, len(ranks)))
        ordered.extend(values[:share].tolist())
    return sum(ordered)


class DataParallelRunner:
    """Trains one replica of a model on this worker, in lockstep with the other replicas."""

    def __init__(
        self,
        model: PipelineStage,
        channel: PeerChannel,
        *,
        ranks: Sequence[int],
        num_micro_batches: int,
        optimizer: OptimizerConfig,
        sync_every: int = 1,
        sync_initial_parameters: bool = True,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout: timedelta | None = timedelta(minutes=10),
    ) -> None:
        """Args:
        model: the whole model as one stage (``is_first`` and ``is_last``: returns the loss).
        channel: tensor exchange with the other replicas.
        ranks: the channel ranks of all replicas; this rank's position picks its share.
        num_micro_batches: micro-batches in one *global* batch (all replicas together).
        optimizer: AdamW hyperparameters.
        sync_every: 1 to all-reduce gradients every step (exact); k > 1 to average parameters every
            k steps instead (local SGD, changes convergence).
        sync_initial_parameters: start every replica from ``ranks[0]``'s parameters.
        bucket_bytes: size of the flattened buffers that are all-reduced.
        timeout: longest wait for one tensor from a peer.
        """
        if not (model.is_first and model.is_last):
            raise ValueError("data parallelism needs the whole model on each replica (a first and last stage)")
        if channel.rank not in ranks or len(set(ranks)) != len(ranks):
            raise ValueError(f"ranks {list(ranks)} must be distinct and include this rank ({channel.rank})")
        if sync_every < 1 or num_micro_batches < 1:
            raise ValueError(f"need sync_every >= 1 and num_micro_batches >= 1, not {sync_every}, {num_micro_batches}")
        self._model = model
        self._channel = channel
        self._ranks = list(ranks)
        self._num_micro_batches = num_micro_batches
        self._sync_every = sync_every
        self._bucket_bytes = bucket_bytes
        self._timeout = timeout
        self._steps_since_sync = 0
        self._parameters = list(model.parameters())
        self.local_micro_batches = shard_micro_batches(
            num_micro_batches, self._ranks.index(channel.rank), len(self._ranks)
        )
        """Global indices of the micro-batches this replica trains on; `run_step` takes exactly these."""
        self.optimizer = build_adamw(self._parameters, optimizer)
        """This replica's AdamW."""
        if sync_initial_parameters:
            broadcast_coalesced_(
                channel,
                [parameter.data for parameter in self._parameters],
                root=self._ranks[0],
                ranks=self._ranks,
                key=TensorKey(step=-1, micro_batch=-1, name="dp/init"),
                bucket_bytes=bucket_bytes,
                timeout=timeout,
            )

    def run_step(self, step: int, micro_batches: Sequence[MicroBatch]) -> float:
        """Train one step on this replica's share (``micro_batches[i]`` is global micro-batch
        ``local_micro_batches[i]``).

        Returns:
            The mean loss over the global batch (the same number on every replica).

        Raises:
            JobError: the loss is not finite (on every replica; no parameter has changed).
            TransportError: a peer sent something unexpected, failed or timed out.
        """
        if len(micro_batches) != len(self.local_micro_batches):
            raise ValueError(
                f"step {step}: replica got {len(micro_batches)} micro-batches, "
                f"its share is {len(self.local_micro_batches)}"
            )
        exact = self._sync_every == 1
        try:
            local_losses = []
            for batch in micro_batches:
                loss = self._model(None, batch)
                # Reported as the reference does: the sum over the batch of float64(loss / M).
                reported = loss / self._num_micro_batches
                local_losses.append(float(reported.detach().to(torch.float64)))
                torch.autograd.backward(reported if exact else loss / len(micro_batches))
            mean_loss = self._global_mean_loss(step, local_losses)
            check_finite_loss(step, mean_loss)
            if exact:
                all_reduce_gradients_(
                    self._channel,
                    self._parameters,
                    ranks=self._ranks,
                    key=TensorKey(step=step, micro_batch=-1, name="dp/grad"),
                    bucket_bytes=self._bucket_bytes,
                    timeout=self._timeout,
                )
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        if not exact:
            self._steps_since_sync += 1
            if self._steps_since_sync == self._sync_every:
                self._average_parameters(step)
                self._steps_since_sync = 0
        return mean_loss

    def _global_mean_loss(self, step: int, local_losses: list[float]) -> float:
        """Mean over all micro-batches (scaled losses added in global micro-batch order, as the reference)."""
        return global_loss(
            self._channel,
            local_losses,
            ranks=self._ranks,
            num_micro_batches=self._num_micro_batches,
            key=TensorKey(step=step, micro_batch=-1, name="dp/loss"),
            timeout=self._timeout,
        )

    def _average_parameters(self, step: int) -> None:
        tensors = [parameter.data for parameter in self._parameters]
        all_reduce_coalesced_(
            self._channel,
            tensors,
            ranks=self._ranks,
            key=TensorKey(step=step, micro_batch=-1, name="dp/params"),
            bucket_bytes=self._bucket_bytes,
            timeout=self._timeout,
        )
        for tensor in tensors:
            tensor.div_(len(self._ranks))
