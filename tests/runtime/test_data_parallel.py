"""Data parallelism over in-process channels: gradient all-reduce equals single-device training on the
whole batch (gpt2-tiny, even and uneven shares, and combined with pipeline stages), replicas stay
bit-identical, local SGD averages parameters every k steps, and a non-finite loss is refused everywhere."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import pytest
import torch

from cetd.errors import JobError
from cetd.runtime.data_parallel import DataParallelRunner, all_reduce_gradients_, shard_micro_batches
from cetd.runtime.local_channel import LocalPeerChannel, run_on_local_ranks
from cetd.runtime.models import StageModule
from cetd.runtime.models.loading import load_model
from cetd.runtime.pipeline import OptimizerConfig, PipelineStageRunner
from cetd.runtime.reference import build_adamw, train_reference
from cetd.transport.channel import TensorKey, TensorSpec

torch.set_num_threads(1)

Batch = Mapping[str, torch.Tensor]


def gpt2_steps(steps: int, micro: int, seed: int = 11) -> list[list[Batch]]:
    generator = torch.Generator().manual_seed(seed)

    def batch() -> Batch:
        input_ids = torch.randint(0, 256, (2, 8), generator=generator)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[0, 6:] = 0
        return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}

    return [[batch() for _ in range(micro)] for _ in range(steps)]


def whole_model(dtype: torch.dtype, seed: int = 0) -> StageModule:
    model, _, adapter = load_model("gpt2-tiny", seed=seed, dtype=dtype)
    return adapter.make_stage(model, 0, adapter.num_blocks(model), first=True, last=True)


def full_state(stage: StageModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in stage.named_parameters_full()}


def test_shares_are_contiguous_and_cover_the_batch() -> None:
    assert [list(shard_micro_batches(8, i, 2)) for i in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [list(shard_micro_batches(5, i, 3)) for i in range(3)] == [[0, 1], [2, 3], [4]]
    assert [len(shard_micro_batches(2, i, 3)) for i in range(3)] == [1, 1, 0]
    with pytest.raises(ValueError, match="outside"):
        shard_micro_batches(4, 2, 2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("world", "micro"), [(2, 4), (3, 5)])
@pytest.mark.parametrize(
    ("dtype", "lr", "tolerance"),
    [(torch.float64, 1e-2, 1e-12), (torch.float32, 1e-4, 1e-6)],  # see test_pipeline for float32's lr
)
def test_gradient_all_reduce_equals_single_device_training(
    world: int, micro: int, dtype: torch.dtype, lr: float, tolerance: float
) -> None:
    settings = OptimizerConfig(lr=lr, weight_decay=0.01)
    steps = gpt2_steps(steps=5, micro=micro)
    model, _, adapter = load_model("gpt2-tiny", seed=0, dtype=dtype)
    reference = train_reference(model, steps, settings=settings, seed=0, adapter=adapter)

    # Replicas other than the first start from other weights: the runner copies rank 0's. (Built
    # here, not on the rank threads: loading seeds torch's global RNG, which threads would share.)
    replicas = [whole_model(dtype, seed=rank) for rank in range(world)]

    def body(channel: LocalPeerChannel) -> tuple[list[float], dict[str, torch.Tensor]]:
        stage = replicas[channel.rank]
        runner = DataParallelRunner(
            stage,
            channel,
            ranks=list(range(world)),
            num_micro_batches=micro,
            optimizer=settings,
            timeout=timedelta(seconds=30),
        )
        share = runner.local_micro_batches
        losses = [runner.run_step(step, [batches[i] for i in share]) for step, batches in enumerate(steps)]
        return losses, full_state(stage)

    results = run_on_local_ranks(world, body, timeout=timedelta(seconds=100))
    for losses, state in results[1:]:
        assert losses == results[0][0]
        assert all(torch.equal(state[name], results[0][1][name]) for name in state)
    losses, state = results[0]
    assert losses[0] == reference.losses[0]  # before any update: bit for bit
    assert max(abs(a - b) for a, b in zip(losses, reference.losses, strict=True)) <= tolerance
    assert state.keys() == reference.state_dict.keys()
    assert max(float((state[n] - reference.state_dict[n]).abs().max()) for n in state) <= tolerance


@pytest.mark.timeout(120)
def test_local_sgd_averages_parameters_every_k_steps() -> None:
    settings = OptimizerConfig(lr=1e-3)
    steps = gpt2_steps(steps=4, micro=4)

    # Expected: each replica trains alone on its share (loss / share size), parameters averaged after
    # steps 2 and 4.
    replicas = [whole_model(torch.float64) for _ in range(2)]
    optimizers = [build_adamw(stage.parameters(), settings) for stage in replicas]
    for step, batches in enumerate(steps):
        for index, (stage, optimizer) in enumerate(zip(replicas, optimizers, strict=True)):
            share = [batches[i] for i in shard_micro_batches(4, index, 2)]
            for batch in share:
                torch.autograd.backward(stage(None, batch) / len(share))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step % 2 == 1:
            with torch.no_grad():
                for a, b in zip(replicas[0].parameters(), replicas[1].parameters(), strict=True):
                    a.copy_((a + b) / 2)
                    b.copy_(a)
    expected = full_state(replicas[0])

    stages = [whole_model(torch.float64) for _ in range(2)]

    def body(channel: LocalPeerChannel) -> list[dict[str, torch.Tensor]]:
        stage = stages[channel.rank]
        runner = DataParallelRunner(stage, channel, ranks=[0, 1], num_micro_batches=4, optimizer=settings, sync_every=2)
        states = []
        for step, batches in enumerate(steps):
            runner.run_step(step, [batches[i] for i in runner.local_micro_batches])
            states.append(full_state(stage))
        return states

    first, second = run_on_local_ranks(2, body, timeout=timedelta(seconds=100))
    # Between synchronisations the replicas differ; after each they are identical.
    assert any(not torch.equal(first[0][n], second[0][n]) for n in first[0])
    for step in (1, 3):
        assert all(torch.equal(first[step][n], second[step][n]) for n in first[step])
    assert all(torch.equal(first[3][n], expected[n]) for n in expected)


@pytest.mark.timeout(60)
def test_non_finite_loss_is_refused_on_every_replica() -> None:
    steps = gpt2_steps(steps=2, micro=2)
    stages = [whole_model(torch.float32) for _ in range(2)]
    with torch.no_grad():
        # A huge embedding row for the tokens of rank 1's micro-batch makes its loss infinite/NaN.
        stages[1].get_parameter("transformer.wte.weight")[steps[1][1]["input_ids"][0, 0]] = float("inf")

    def body(channel: LocalPeerChannel) -> tuple[str, bool]:
        stage = stages[channel.rank]
        runner = DataParallelRunner(
            stage,
            channel,
            ranks=[0, 1],
            num_micro_batches=2,
            optimizer=OptimizerConfig(),
            sync_initial_parameters=False,
        )
        before = full_state(stage)
        with pytest.raises(JobError, match="step 1") as refused:
            runner.run_step(1, [steps[1][channel.rank]])
        after = full_state(stage)
        return str(refused.value), all(torch.equal(before[n], after[n]) for n in before)

    for message, unchanged in run_on_local_ranks(2, body):
        assert "refused" in message
        assert unchanged


@pytest.mark.timeout(120)
def test_pipeline_replicas_with_a_gradient_all_reduce_hook_equal_single_device_training() -> None:
    """2 data-parallel replicas x 2 pipeline stages (rank = 2 * replica + stage), gpt2-tiny, float64."""
    settings = OptimizerConfig(lr=1e-2)
    steps = gpt2_steps(steps=4, micro=4)
    model, _, adapter = load_model("gpt2-tiny", seed=0, dtype=torch.float64)
    reference = train_reference(model, steps, settings=settings, seed=0, adapter=adapter)
    stages = []
    for _ in range(2):
        fresh, _, adapter = load_model("gpt2-tiny", seed=0, dtype=torch.float64)
        stages += [
            adapter.make_stage(fresh, 0, 2, first=True, last=False, copy_parameters=True),
            adapter.make_stage(fresh, 2, 4, first=False, last=True, copy_parameters=True),
        ]

    def body(channel: LocalPeerChannel) -> tuple[list[float | None], dict[str, torch.Tensor]]:
        replica, stage_index = divmod(channel.rank, 2)
        stage = stages[channel.rank]
        peers = [stage_index, 2 + stage_index]  # the same stage in both replicas

        def average_gradients(step: int) -> None:
            key = TensorKey(step=step, micro_batch=-1, name=f"dp/stage{stage_index}")
            # Each replica's pipeline scaled its losses by 1/2 (its share): divide the sum by 2 replicas.
            all_reduce_gradients_(channel, list(stage.parameters()), ranks=peers, key=key, divide_by=2)

        runner = PipelineStageRunner(
            stage,
            channel,
            stage_index=stage_index,
            stage_ranks=[2 * replica, 2 * replica + 1],
            schedule="1f1b",
            num_micro_batches=2,
            hidden_spec=TensorSpec(dtype=torch.float64, shape=(2, 8, 64)),
            optimizer=settings,
            before_optimizer_step=average_gradients,
        )
        share = shard_micro_batches(4, replica, 2)
        losses = [runner.run_step(step, [batches[i] for i in share]) for step, batches in enumerate(steps)]
        return losses, full_state(stage)

    results = run_on_local_ranks(4, body, timeout=timedelta(seconds=100))
    merged = {**results[0][1], **results[1][1]}
    assert max(float((merged[n] - reference.state_dict[n]).abs().max()) for n in merged) <= 1e-12
    for rank in (2, 3):  # the second replica holds the same bits as the first
        assert all(torch.equal(results[rank][1][n], results[rank - 2][1][n]) for n in results[rank][1])
    replica_losses = [[float(loss) for loss in results[rank][0] if loss is not None] for rank in (1, 3)]
    for step, expected in enumerate(reference.losses):
        assert (replica_losses[0][step] + replica_losses[1][step]) / 2 == pytest.approx(expected, abs=1e-12)
