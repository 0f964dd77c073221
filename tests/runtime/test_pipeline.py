"""Pipeline training over in-process channels equals single-process training with the same micro-batching.

Toy stages (tanh layers with an input/output weight tied across the first and last stage, like GPT-2's
embedding and LM head) and gpt2-tiny, 2 and 3 stages, GPipe and 1F1B, float64 and float32.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import cast

import pytest
import torch
from torch import nn

from cetd.errors import JobError
from cetd.runtime.local_channel import LocalPeerChannel, run_on_local_ranks
from cetd.runtime.models.loading import load_model
from cetd.runtime.pipeline import HiddenSpec, OptimizerConfig, PipelineStage, PipelineStageRunner
from cetd.runtime.reference import build_adamw, train_reference
from cetd.runtime.schedules import ScheduleName
from cetd.transport.channel import TensorSpec, TransportError

torch.set_num_threads(1)

Batch = Mapping[str, torch.Tensor]
SETTINGS = OptimizerConfig(lr=1e-2, weight_decay=0.01)
IN, WIDTH, ROWS = 6, 10, 3


class ToyStage(nn.Module):
    """tanh(x W^T) -> tanh layers -> (h W) with an MSE loss; W is tied between the first and last stage."""

    def __init__(self, *, first: bool, last: bool, layers: int, tied: nn.Parameter) -> None:
        super().__init__()
        self.is_first = first
        self.is_last = last
        self.batch_keys = frozenset({"x"} if first else set()) | frozenset({"y"} if last else set())
        if first or last:
            self.tied = tied
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH, dtype=tied.dtype) for _ in range(layers))

    def forward(self, hidden: torch.Tensor | None, batch: Batch) -> torch.Tensor:
        if self.is_first:
            hidden = torch.tanh(batch["x"] @ self.tied.T)
        assert hidden is not None
        for layer in self.layers:
            hidden = torch.tanh(layer(hidden))
        if not self.is_last:
            return hidden
        return nn.functional.mse_loss(hidden @ self.tied, batch["y"])

    def tied_parameters(self) -> dict[str, nn.Parameter]:
        return {"tied": self.tied} if self.is_first != self.is_last else {}


def toy_model(num_stages: int, dtype: torch.dtype, seed: int = 0) -> list[ToyStage]:
    """One process's model: the stages share the tied weight (one Parameter)."""
    torch.manual_seed(seed)
    tied = nn.Parameter(torch.randn(WIDTH, IN, dtype=dtype) * 0.5)
    return [
        ToyStage(first=i == 0, last=i == num_stages - 1, layers=2 if 0 < i < num_stages - 1 else 1, tied=tied)
        for i in range(num_stages)
    ]


def toy_steps(steps: int, micro: int, dtype: torch.dtype, seed: int = 1) -> list[list[Batch]]:
    generator = torch.Generator().manual_seed(seed)

    def batch() -> Batch:
        return {
            "x": torch.randn(ROWS, IN, generator=generator, dtype=torch.float64).to(dtype),
            "y": torch.randn(ROWS, IN, generator=generator, dtype=torch.float64).to(dtype),
        }

    return [[batch() for _ in range(micro)] for _ in range(steps)]


def train_toy_reference(stages: list[ToyStage], steps: list[list[Batch]]) -> list[float]:
    """Single process, same micro-batching: (loss_m / M).backward() for each m, then AdamW."""
    unique = list({id(p): p for stage in stages for p in stage.parameters()}.values())
    optimizer = build_adamw(unique, SETTINGS)
    losses = []
    for micro_batches in steps:
        total = 0.0
        for batch in micro_batches:
            hidden: torch.Tensor | None = None
            for stage in stages:
                hidden = stage(hidden, batch)
            assert hidden is not None
            scaled = hidden / len(micro_batches)
            scaled.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward untyped
            total += float(scaled.detach().double())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


@dataclass(frozen=True)
class PipelineResult:
    losses: list[float]
    parameters: list[dict[str, torch.Tensor]]
    """Per stage, its parameters by name after training."""


def train_pipeline(
    stages: Sequence[PipelineStage],
    steps: list[list[Batch]],
    *,
    schedule: ScheduleName,
    hidden_spec: HiddenSpec,
    settings: OptimizerConfig = SETTINGS,
) -> PipelineResult:
    """Each stage on its own thread and rank (rank i runs stage i)."""
    count = len(stages)

    def body(channel: LocalPeerChannel) -> tuple[list[float | None], dict[str, torch.Tensor]]:
        stage = stages[channel.rank]
        runner = PipelineStageRunner(
            stage,
            channel,
            stage_index=channel.rank,
            stage_ranks=list(range(count)),
            schedule=schedule,
            num_micro_batches=len(steps[0]),
            hidden_spec=hidden_spec,
            optimizer=settings,
            recv_timeout=timedelta(seconds=30),
        )
        losses = [runner.run_step(step, micro_batches) for step, micro_batches in enumerate(steps)]
        # Model adapters' stages name parameters as the full model does; toy stages by their own names.
        module = cast(nn.Module, stage)
        named = getattr(module, "named_parameters_full", module.named_parameters)
        return losses, {name: p.detach().clone() for name, p in named()}

    results = run_on_local_ranks(count, body, timeout=timedelta(seconds=120))
    assert all(loss is None for loss in results[0][0]) or count == 1
    last_losses = results[-1][0]
    return PipelineResult(
        losses=[float(loss) for loss in last_losses if loss is not None], parameters=[r[1] for r in results]
    )


def max_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name].double() - b[name].double()).abs().max()) for name in a)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("num_stages", [1, 2, 3])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_toy_pipeline_equals_single_process(
    schedule: ScheduleName, num_stages: int, dtype: torch.dtype, tolerance: float
) -> None:
    steps = toy_steps(steps=6, micro=4, dtype=dtype)
    reference = toy_model(num_stages, dtype)
    distributed = [copy.deepcopy(stage) for stage in reference]  # each stage its own tied copy
    assert (distributed[0].tied is not distributed[-1].tied) == (num_stages > 1)
    expected = train_toy_reference(reference, steps)
    result = train_pipeline(
        distributed, steps, schedule=schedule, hidden_spec=TensorSpec(dtype=dtype, shape=(ROWS, WIDTH))
    )
    assert result.losses[0] == expected[0]  # before any update: bit for bit
    assert max(abs(a - b) for a, b in zip(result.losses, expected, strict=True)) <= tolerance
    for stage, parameters in zip(reference, result.parameters, strict=True):
        expected_parameters = {name: p.detach() for name, p in stage.named_parameters()}
        assert max_difference(parameters, expected_parameters) <= tolerance
    # The tied copies did not drift apart.
    assert torch.equal(result.parameters[0]["tied"], result.parameters[-1]["tied"])


@pytest.mark.timeout(60)
def test_non_finite_loss_is_refused_on_every_stage_and_parameters_stay() -> None:
    dtype = torch.float64
    steps = toy_steps(steps=3, micro=2, dtype=dtype)
    steps[1][1] = {"x": steps[1][1]["x"], "y": torch.full((ROWS, IN), float("nan"), dtype=dtype)}
    stages = [copy.deepcopy(stage) for stage in toy_model(2, dtype)]

    def body(channel: LocalPeerChannel) -> tuple[str, bool, bool]:
        runner = PipelineStageRunner(
            stages[channel.rank],
            channel,
            stage_index=channel.rank,
            stage_ranks=[0, 1],
            schedule="1f1b",
            num_micro_batches=2,
            hidden_spec=TensorSpec(dtype=dtype, shape=(ROWS, WIDTH)),
            optimizer=SETTINGS,
            recv_timeout=timedelta(seconds=30),
        )
        runner.run_step(0, steps[0])
        before = {name: p.detach().clone() for name, p in stages[channel.rank].named_parameters()}
        with pytest.raises(JobError, match="step 1") as refused:
            runner.run_step(1, steps[1])
        after = dict(stages[channel.rank].named_parameters())
        unchanged = all(torch.equal(before[name], after[name]) for name in before)
        no_grads = all(p.grad is None for p in after.values())
        runner.run_step(2, steps[2])  # training goes on with the next batch
        return str(refused.value), unchanged, no_grads

    for message, unchanged, no_grads in run_on_local_ranks(2, body):
        assert "the loss is nan" in message
        assert unchanged
        assert no_grads


@pytest.mark.timeout(60)
def test_a_stage_receiving_the_wrong_activation_shape_raises_transport_error() -> None:
    dtype = torch.float32
    stages = [copy.deepcopy(stage) for stage in toy_model(2, dtype)]
    with pytest.raises(TransportError, match=r"expected TensorKey\(step=0, micro_batch=0, name='act'\)"):
        train_pipeline(
            stages,
            toy_steps(1, 2, dtype),
            schedule="gpipe",
            hidden_spec=TensorSpec(dtype=dtype, shape=(ROWS, WIDTH + 1)),
        )


def test_runner_checks_its_place_in_the_pipeline() -> None:
    stages = toy_model(2, torch.float32)
    channel = run_on_local_ranks(2, lambda ch: ch)[1]
    with pytest.raises(ValueError, match="is_first"):
        PipelineStageRunner(
            stages[0],
            channel,
            stage_index=1,
            stage_ranks=[0, 1],
            schedule="gpipe",
            num_micro_batches=2,
            hidden_spec=TensorSpec(dtype=torch.float32, shape=(1,)),
            optimizer=SETTINGS,
        )
    with pytest.raises(ValueError, match="not run by this rank"):
        PipelineStageRunner(
            stages[0],
            channel,
            stage_index=0,
            stage_ranks=[0, 1],
            schedule="gpipe",
            num_micro_batches=2,
            hidden_spec=TensorSpec(dtype=torch.float32, shape=(1,)),
            optimizer=SETTINGS,
        )


GPT2_SPLITS = {2: [(0, 2), (2, 4)], 3: [(0, 1), (1, 3), (3, 4)]}


def gpt2_steps(steps: int, micro: int, seed: int = 7) -> list[list[Batch]]:
    """Random token micro-batches of 2 x 8; the second row of every micro-batch ends in 3 pad tokens."""
    generator = torch.Generator().manual_seed(seed)

    def batch() -> Batch:
        input_ids = torch.randint(0, 256, (2, 8), generator=generator)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5:] = 0
        return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}

    return [[batch() for _ in range(micro)] for _ in range(steps)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("num_stages", [2, 3])
@pytest.mark.parametrize(
    ("dtype", "lr", "tolerance"),
    [
        (torch.float64, 1e-2, 1e-12),
        # The tied weight's gradient is summed in another order (per stage, then across), a last-bit
        # difference. Where a gradient is pure rounding noise (the attention key bias: softmax ignores
        # it) AdamW turns that into differences of the order of lr, hence a fine-tuning lr in float32.
        (torch.float32, 1e-4, 1e-6),
    ],
)
def test_gpt2_tiny_pipeline_equals_the_reference_trainer(
    schedule: ScheduleName, num_stages: int, dtype: torch.dtype, lr: float, tolerance: float
) -> None:
    settings = OptimizerConfig(lr=lr, weight_decay=0.01)
    steps = gpt2_steps(steps=5, micro=4)
    model, _, adapter = load_model("gpt2-tiny", seed=0, dtype=dtype)
    reference = train_reference(model, steps, settings=settings, seed=0, adapter=adapter)

    fresh, _, adapter = load_model("gpt2-tiny", seed=0, dtype=dtype)
    splits = GPT2_SPLITS[num_stages]
    stages = [
        adapter.make_stage(fresh, start, end, first=i == 0, last=i == num_stages - 1, copy_parameters=True)
        for i, (start, end) in enumerate(splits)
    ]
    assert stages[0].tied_parameters().keys() == stages[-1].tied_parameters().keys() == {"transformer.wte.weight"}

    def hidden_spec(batch: Batch) -> TensorSpec:
        rows, length = batch["attention_mask"].shape
        spec_dtype, shape = adapter.hidden_spec(rows, length)
        return TensorSpec(dtype=spec_dtype, shape=shape)

    result = train_pipeline(stages, steps, schedule=schedule, hidden_spec=hidden_spec, settings=settings)
    assert result.losses[0] == reference.losses[0]  # before any update: bit for bit
    assert max(abs(a - b) for a, b in zip(result.losses, reference.losses, strict=True)) <= tolerance
    merged: dict[str, torch.Tensor] = {}
    for parameters in result.parameters:
        merged.update(parameters)
    assert max_difference(merged, reference.state_dict) <= tolerance
    embedding = "transformer.wte.weight"
    assert torch.equal(result.parameters[0][embedding], result.parameters[-1][embedding])
