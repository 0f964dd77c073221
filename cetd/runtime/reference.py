"""Single-process reference training: the numbers every parallel mode must reproduce.

One optimizer step = forward and backward of each of the step's M micro-batches, each loss scaled by
1/M (so the gradient is that of the mean loss), then one AdamW step. The model runs as a single
`StageModule` covering every block, i.e. through exactly the embedding, block and head code the
parallel modes run, with the same loss function.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from cetd.runtime.models import ModelAdapter, adapter_for


@dataclass(frozen=True, slots=True, kw_only=True)
class AdamWSettings:
    """AdamW hyper-parameters; every worker of a job builds its optimizer from the same settings."""

    lr: float = 1e-4
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates."""
    eps: float = 1e-8
    """Adam's denominator epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"learning rate must be positive, not {self.lr}")


def build_adamw(params: Iterable[nn.Parameter], settings: AdamWSettings) -> torch.optim.AdamW:
    """AdamW with the single-tensor code path.

    Why ``foreach=False``: the multi-tensor path groups tensors differently depending on which
    parameters a worker holds; the single-tensor path does the same arithmetic per tensor however the
    model is split.
    """
    return torch.optim.AdamW(
        list(params),
        lr=settings.lr,
        betas=settings.betas,
        eps=settings.eps,
        weight_decay=settings.weight_decay,
        foreach=False,
        fused=False,
    )


@dataclass(frozen=True, slots=True)
class ReferenceRun:
    """What a reference run produced."""

    losses: list[float]
    """Mean loss of each step (over its micro-batches), before that step's update."""
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    """Final parameters keyed by the full model's canonical names (tied weights once)."""


def train_reference(
    model: nn.Module,
    batches: Iterable[Sequence[Mapping[str, torch.Tensor]]],
    *,
    settings: AdamWSettings,
    seed: int,
    adapter: ModelAdapter | None = None,
) -> ReferenceRun:
    """Train ``model`` in place on ``batches`` (one list of micro-batches per step).

    Args:
        model: a supported transformers model.
        batches: the steps, each a sequence of M micro-batches.
        settings: optimizer settings.
        seed: seeds torch's RNG for the run (forked, so the caller's RNG is untouched).
        adapter: the model's adapter; looked up when omitted.

    Returns:
        Per-step losses and the final state.
    """
    adapter = adapter or adapter_for(model)
    stage = adapter.make_stage(model, 0, adapter.num_blocks(model), first=True, last=True)
    optimizer = build_adamw(stage.parameters(), settings)
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for micro_batches in batches:
            optimizer.zero_grad(set_to_none=True)
            count = len(micro_batches)
            step_loss = torch.zeros((), dtype=torch.float64)
            for micro_batch in micro_batches:
                loss = stage(None, micro_batch) / count
                loss.backward()
                step_loss += loss.detach().to(torch.float64)
            optimizer.step()
            losses.append(float(step_loss))
    state = {name: param.detach().clone() for name, param in stage.named_parameters_full()}
    return ReferenceRun(losses, state)
