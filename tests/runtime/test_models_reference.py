"""The single-process reference trainer: deterministic, accumulating micro-batches as one mean."""

from __future__ import annotations

import pytest
import torch

from cetd.runtime.data import TokenizedDataset, make_batches
from cetd.runtime.models.loading import load_model
from cetd.runtime.reference import AdamWSettings, train_reference


def dataset(seed: int = 0) -> TokenizedDataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (24, 16), generator=generator)
    mask = torch.ones_like(ids)
    mask[::4, 10:] = 0
    return TokenizedDataset({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})


@pytest.mark.timeout(60)
def test_reference_runs_are_identical_and_learn() -> None:
    steps = list(make_batches(dataset(), global_batch=8, micro_batches=4, seed=7, steps=4))
    runs = []
    for _ in range(2):
        model, _, _ = load_model("gpt2-tiny", seed=0)
        runs.append(train_reference(model, steps, settings=AdamWSettings(lr=3e-3), seed=0))
    assert runs[0].losses == runs[1].losses
    assert all(torch.equal(runs[0].state_dict[k], runs[1].state_dict[k]) for k in runs[0].state_dict)
    assert runs[0].losses[-1] < runs[0].losses[0] - 0.05
    assert "lm_head.weight" not in runs[0].state_dict
    assert "transformer.wte.weight" in runs[0].state_dict


@pytest.mark.timeout(60)
def test_micro_batches_accumulate_to_the_whole_batch_gradient() -> None:
    """Without padding every micro-batch has as many targets, so M micro-batches of loss / M are one batch."""
    full = dataset()
    unpadded = TokenizedDataset(
        {
            **full.tensors,
            "attention_mask": torch.ones_like(full.tensors["input_ids"]),
            "labels": full.tensors["input_ids"],
        }
    )
    split = list(make_batches(unpadded, global_batch=8, micro_batches=4, seed=7, steps=2))
    whole = [[{k: torch.cat([mb[k] for mb in step]) for k in step[0]}] for step in split]
    runs = []
    for steps in (split, whole):
        model, _, _ = load_model("gpt2-tiny", seed=0, dtype=torch.float64)
        runs.append(train_reference(model, steps, settings=AdamWSettings(lr=1e-3), seed=0))
    assert max(abs(a - b) for a, b in zip(runs[0].losses, runs[1].losses, strict=True)) <= 1e-12
    assert max(float((runs[0].state_dict[k] - runs[1].state_dict[k]).abs().max()) for k in runs[0].state_dict) <= 1e-9
