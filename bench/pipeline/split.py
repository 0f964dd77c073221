"""Balanced pipeline stages from measured costs: time each part of the model once, split to minimise the max.

`measure_costs` times (in CPU seconds) forward + backward of the embedding, of every block and of the head with its
loss on one micro-batch, and AdamW per parameter, on this process's (pinned, one-thread) core.
`balanced_split` then picks the contiguous block ranges whose slowest stage is fastest for M
micro-batches per step: a stage costs M × (its parts' forward + backward) plus its AdamW step, and
the first and last stage both hold (and step) a tied embedding / LM-head weight.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cetd.runtime.models import ModelAdapter
from cetd.runtime.models.base import additive_mask, block_output
from cetd.runtime.reference import AdamWSettings, build_adamw

__all__ = ["StageCosts", "balanced_split", "measure_costs", "stage_seconds"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StageCosts:
    """Seconds of forward + backward of one micro-batch, per part of the model, and AdamW per parameter."""

    embedding: float
    blocks: tuple[float, ...]
    head: float
    """Final norm, LM head and loss."""
    adamw_per_parameter: float
    embedding_parameters: int
    """Parameters of the first stage besides its blocks (token and position embeddings)."""
    block_parameters: tuple[int, ...]
    head_parameters: int
    """Parameters of the last stage besides its blocks (final norm and the tied LM head)."""

    def to_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _fastest_seconds(runs: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Each run's fastest of ``repeats`` timings in this thread's CPU seconds, the runs interleaved.

    CPU seconds, not wall seconds: on a shared machine the thread may wait for its core for most of a
    run, which wall time would charge to the part measured. The fastest, not the median: every other
    disturbance (caches, frequency) only adds time. Interleaved, so that what remains hits all alike.
    """
    for run in runs:
        run()  # warm-up: allocator and kernel selection
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for index, run in enumerate(runs):
            started = time.thread_time()
            run()
            best[index] = min(best[index], time.thread_time() - started)
    return best


def measure_costs(model: torch.nn.Module, adapter: ModelAdapter, batch: dict[str, torch.Tensor], *, repeats: int = 7) -> StageCosts:
    """Time each part of ``model`` on ``batch`` (one micro-batch) with the stage code cetd runs."""
    num_blocks = adapter.num_blocks(model)
    whole = adapter.make_stage(model, 0, num_blocks, first=True, last=True)
    hidden_shape = (*batch["input_ids"].shape, adapter.hidden_size())
    hidden = torch.randn(hidden_shape, requires_grad=True)
    mask = additive_mask(batch["attention_mask"], causal=True, dtype=hidden.dtype, device=hidden.device)

    def embedding() -> None:
        out = whole.embed(batch)
        torch.autograd.backward(out, grad_tensors=torch.ones_like(out))

    def block(index: int) -> Callable[[], None]:
        module = whole.part(adapter.block_path(index))

        def run() -> None:
            out = block_output(module(hidden, None, mask))
            torch.autograd.backward(out, grad_tensors=torch.ones_like(out))

        return run

    def head() -> None:
        torch.autograd.backward(whole.loss_from_logits(whole.head_logits(hidden, batch), batch))

    parameters = list(whole.parameters())
    optimizer = build_adamw(parameters, AdamWSettings())
    seconds = _fastest_seconds([embedding, *(block(i) for i in range(num_blocks)), head, optimizer.step], repeats)
    embedding_seconds, *block_list, head_seconds, adamw_seconds = seconds
    block_seconds = tuple(block_list)
    total = sum(p.numel() for p in parameters)

    def count(paths: Sequence[str]) -> int:
        return sum(p.numel() for path in paths for p in whole.part(path).parameters())

    return StageCosts(
        embedding=embedding_seconds,
        blocks=block_seconds,
        head=head_seconds,
        adamw_per_parameter=adamw_seconds / total,
        embedding_parameters=count(["transformer.wte", "transformer.wpe"]),
        block_parameters=tuple(count([adapter.block_path(i)]) for i in range(num_blocks)),
        head_parameters=count(["transformer.ln_f", "transformer.wte"]),  # the LM head is the tied embedding
    )


def stage_seconds(costs: StageCosts, boundaries: Sequence[int], micro_batches: int) -> list[float]:
    """Predicted seconds per step of each stage; ``boundaries`` are the S + 1 block indices 0..L."""
    count = len(boundaries) - 1
    seconds = []
    for stage in range(count):
        start, end = boundaries[stage], boundaries[stage + 1]
        compute = sum(costs.blocks[start:end])
        parameters = sum(costs.block_parameters[start:end])
        if stage == 0:
            compute += costs.embedding
            parameters += costs.embedding_parameters
        if stage == count - 1:
            compute += costs.head
            parameters += costs.head_parameters
        seconds.append(micro_batches * compute + parameters * costs.adamw_per_parameter)
    return seconds


def balanced_split(costs: StageCosts, stages: int, micro_batches: int) -> tuple[int, ...]:
    """Block boundaries (0, b1, …, L) of ``stages`` contiguous stages, each with at least one block,
    minimising the slowest stage's predicted time (ties: the more even block count)."""
    num_blocks = len(costs.blocks)
    if not 1 <= stages <= num_blocks:
        raise ValueError(f"cannot cut {num_blocks} blocks into {stages} stages")
    best: tuple[float, int, tuple[int, ...]] | None = None
    for cuts in itertools.combinations(range(1, num_blocks), stages - 1):
        boundaries = (0, *cuts, num_blocks)
        slowest = max(stage_seconds(costs, boundaries, micro_batches))
        spread = max(b - a for a, b in itertools.pairwise(boundaries))
        candidate = (slowest, spread, boundaries)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    assert best is not None
    return best[2]
