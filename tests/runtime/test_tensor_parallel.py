"""Tensor parallelism over threads computes the unsplit model's loss, gradients and training run."""

from __future__ import annotations

import pytest
import torch

from cetd.runtime.data import TokenizedDataset, make_batches
from cetd.runtime.models.loading import load_model
from cetd.runtime.reference import AdamWSettings, build_adamw, train_reference
from cetd.runtime.tensor_parallel import gather_full_state_dict, make_tensor_parallel_model, split_sizes
from tests.runtime.conftest import ThreadAllReduce, make_batch, max_abs_diff, run_ranks

CASES = [
    ("gpt2-tiny", 2),
    ("gpt2-tiny", 3),
    ("opt-tiny", 2),
    ("opt-tiny", 3),
    ("bert-tiny", 2),
    ("bert-tiny", 3),
    ("distilbert-tiny", 2),
    ("distilbert-tiny", 4),
    ("minilm", 2),
]


def tp_loss_and_grads(name: str, world: int, dtype: torch.dtype) -> dict[str, float]:
    model, _, adapter = load_model(name, seed=0, dtype=dtype)
    batch = make_batch(adapter, adapter.config.vocab_size)
    full = adapter.make_stage(model, 0, adapter.num_blocks(model), first=True, last=True)
    loss = full(None, batch)
    loss.backward()
    full_grads = {n: p.grad for n, p in full.named_parameters_full() if p.grad is not None}
    full_params = {n: p.detach() for n, p in full.named_parameters_full()}
    group = ThreadAllReduce(world)
    ranks = [make_tensor_parallel_model(model, adapter, r, world, group.for_rank(r)) for r in range(world)]

    def work(rank: int) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        rank_loss = ranks[rank](batch)
        rank_loss.backward()
        return float(rank_loss.detach()), ranks[rank].shard_grads(), ranks[rank].shard_state_dict()

    results = run_ranks(world, work)
    layout = ranks[0].layout
    grads = gather_full_state_dict([g for _, g, _ in results], layout)
    params = gather_full_state_dict([p for _, _, p in results], layout)
    assert set(grads) == set(full_grads)
    # Shards really are shards: each rank holds less than the whole model...
    assert all(
        sum(t.numel() for t in shard.values()) < sum(t.numel() for t in full_params.values()) for _, _, shard in results
    )
    # ...and replicated parameters get the same gradient on every rank, bit for bit.
    replicated = [n for n in full_grads if n not in layout]
    for _, rank_grads, _ in results[1:]:
        assert all(torch.equal(rank_grads[n], results[0][1][n]) for n in replicated)
    return {
        "loss": max(abs(rank_loss - float(loss.detach())) for rank_loss, _, _ in results),
        "grads": max_abs_diff(grads, full_grads),
        "params": max_abs_diff(params, full_params),
        "grad_scale": max(float(g.abs().max()) for g in full_grads.values()),
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "world"), CASES)
def test_tensor_parallel_equals_unsplit_in_float64(name: str, world: int) -> None:
    diffs = tp_loss_and_grads(name, world, torch.float64)
    assert diffs["params"] == 0.0
    assert diffs["loss"] <= 1e-10
    assert diffs["grads"] <= 1e-10


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny"])
def test_tensor_parallel_float32_is_close(name: str) -> None:
    diffs = tp_loss_and_grads(name, 2, torch.float32)
    assert diffs["loss"] <= 1e-5
    assert diffs["grads"] <= 1e-5 * max(1.0, diffs["grad_scale"])


@pytest.mark.timeout(60)
def test_tensor_parallel_training_matches_reference() -> None:
    model, _, adapter = load_model("gpt2-tiny", seed=0, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (16, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, 12:] = 0
    dataset = TokenizedDataset({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    steps = list(make_batches(dataset, global_batch=8, micro_batches=2, seed=1, steps=3))
    settings = AdamWSettings(lr=1e-2)
    world = 2
    group = ThreadAllReduce(world)
    ranks = [make_tensor_parallel_model(model, adapter, r, world, group.for_rank(r)) for r in range(world)]
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = train_reference(model, steps, settings=settings, seed=0, adapter=adapter)

    def work(rank: int) -> tuple[list[float], dict[str, torch.Tensor]]:
        tp = ranks[rank]
        optimizer = build_adamw(tp.parameters(), settings)
        losses = []
        for micro_batches in steps:
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), dtype=torch.float64)
            for micro_batch in micro_batches:
                loss = tp(micro_batch) / len(micro_batches)
                loss.backward()
                total += loss.detach()
            optimizer.step()
            losses.append(float(total))
        return losses, tp.shard_state_dict()

    results = run_ranks(world, work)
    final = gather_full_state_dict([state for _, state in results], ranks[0].layout)
    for losses, _ in results:
        assert max(abs(a - b) for a, b in zip(losses, reference.losses, strict=True)) <= 1e-10
    assert max_abs_diff(reference.state_dict, initial) > 1e-3  # training moved the weights
    assert max_abs_diff(final, reference.state_dict) <= 1e-10


@pytest.mark.timeout(30)
def test_split_sizes_and_world_limits() -> None:
    assert split_sizes(4, 3) == [2, 1, 1]
    assert split_sizes(256, 3) == [86, 85, 85]
    model, _, adapter = load_model("gpt2-tiny", seed=0)
    with pytest.raises(ValueError, match="4 units over 5"):
        make_tensor_parallel_model(model, adapter, 0, 5, lambda t: t)
    with pytest.raises(ValueError, match="rank 2"):
        make_tensor_parallel_model(model, adapter, 2, 2, lambda t: t)
