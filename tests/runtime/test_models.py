"""Stages of every family compose to exactly the Hugging Face model; names, ties, masks, loading."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import nn

from cetd.errors import JobError
from cetd.runtime.models import ModelAdapter, StageModule, adapter_for
from cetd.runtime.models.loading import load_model
from tests.runtime.conftest import make_batch

FAMILIES = ["gpt2-tiny", "opt-tiny", "bert-tiny", "distilbert-tiny", "minilm"]


def hf_outputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    kwargs = {k: v for k, v in batch.items() if k != "token_type_ids" or type(model).__name__.startswith("Bert")}
    out = model(**kwargs)
    return out.loss, out.logits


def split(adapter: ModelAdapter, model: nn.Module, cuts: list[int], **kw: bool) -> list[StageModule]:
    bounds = [0, *cuts, adapter.num_blocks(model)]
    return [
        adapter.make_stage(model, a, b, first=i == 0, last=i == len(bounds) - 2, **kw)
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


def run(stages: list[StageModule], batch: Mapping[str, torch.Tensor], *, logits: bool = False) -> torch.Tensor:
    hidden = None
    for stage in stages[:-1]:
        hidden = stage(hidden, {k: batch[k] for k in stage.batch_keys})
    last = stages[-1]
    return last.logits(hidden, batch) if logits else last(hidden, {k: batch[k] for k in last.batch_keys})


@pytest.fixture(scope="module")
def models64() -> dict[str, tuple[nn.Module, ModelAdapter]]:
    out = {}
    for name in FAMILIES:
        model, _, adapter = load_model(name, seed=0, dtype=torch.float64)
        out[name] = (model, adapter)
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", FAMILIES)
def test_composed_stages_equal_hf_model_in_float64(
    name: str, models64: dict[str, tuple[nn.Module, ModelAdapter]]
) -> None:
    model, adapter = models64[name]
    batch = make_batch(adapter, adapter.config.vocab_size)
    with torch.no_grad():
        hf_loss, hf_logits = hf_outputs(model, batch)
        for cuts in ([2], [1, 3]):
            stages = split(adapter, model, cuts)
            assert (run(stages, batch, logits=True) - hf_logits).abs().max() <= 1e-12
            loss = run(stages, batch)
            # transformers' causal-LM loss downcasts float64 logits to float32; ours stays in float64.
            assert abs(float(loss) - float(hf_loss)) <= 1e-6
            if adapter.task == "causal_lm":
                shifted = batch["labels"][:, 1:].reshape(-1)
                exact = nn.functional.cross_entropy(hf_logits[:, :-1].reshape(-1, hf_logits.shape[-1]), shifted)
            else:
                exact = nn.functional.cross_entropy(hf_logits, batch["labels"])
            assert abs(float(loss) - float(exact)) <= 1e-12


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["gpt2-tiny", "opt-tiny", "distilbert-tiny"])
def test_composed_stages_equal_hf_model_in_float32(name: str) -> None:
    model, _, adapter = load_model(name, seed=0, dtype=torch.float32)
    batch = make_batch(adapter, adapter.config.vocab_size)
    with torch.no_grad():
        hf_loss, hf_logits = hf_outputs(model, batch)
        stages = split(adapter, model, [2])
        assert (run(stages, batch, logits=True) - hf_logits).abs().max() <= 1e-6
        assert abs(float(run(stages, batch)) - float(hf_loss)) <= 1e-6


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["gpt2-tiny", "opt-tiny"])
def test_stages_are_causal(name: str, models64: dict[str, tuple[nn.Module, ModelAdapter]]) -> None:
    model, adapter = models64[name]
    batch = make_batch(adapter, adapter.config.vocab_size)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][:, 8] = (changed["input_ids"][:, 8] + 7) % 200 + 3
    stages = split(adapter, model, [1, 3])
    with torch.no_grad():
        before, after = run(stages, batch, logits=True), run(stages, changed, logits=True)
    assert torch.equal(before[:, :8], after[:, :8])  # the past never sees the future, bit for bit
    assert (before[:, 8:] - after[:, 8:]).abs().max() > 1e-3  # ...while later positions do change


@pytest.mark.timeout(60)
def test_padding_does_not_leak_into_tokens_in_bidirectional_models(
    models64: dict[str, tuple[nn.Module, ModelAdapter]],
) -> None:
    model, adapter = models64["bert-tiny"]
    batch = make_batch(adapter, adapter.config.vocab_size)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, -1] = 5  # a padded position of sequence 0
    stages = split(adapter, model, [2])
    with torch.no_grad():
        assert torch.equal(run(stages, batch, logits=True)[0], run(stages, changed, logits=True)[0])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", FAMILIES)
def test_stage_names_cover_the_full_model_once(name: str, models64: dict[str, tuple[nn.Module, ModelAdapter]]) -> None:
    model, adapter = models64[name]
    stages = split(adapter, model, [1, 3])
    full_names = {n for n, _ in model.named_parameters()}
    seen: list[str] = [n for stage in stages for n in stage.full_state_dict_names()]
    tied = {n for stage in stages for n in stage.tied_parameters()}
    assert set(seen) == full_names
    assert len(seen) == len(full_names) + len(tied)  # a tied weight is held by exactly two stages
    for stage in stages:
        for full, param in stage.named_parameters_full():
            assert param is model.get_parameter(full)  # default stages share the model's parameters


@pytest.mark.timeout(60)
def test_stage_hidden_state_matches_hidden_spec(models64: dict[str, tuple[nn.Module, ModelAdapter]]) -> None:
    model, adapter = models64["opt-tiny"]  # embeds in 32, runs blocks in 64
    batch = make_batch(adapter, adapter.config.vocab_size, batch=2, seq_len=10)
    stage = adapter.make_stage(model, 0, 2, first=True, last=False)
    with torch.no_grad():
        hidden = stage(None, batch)
    assert (hidden.dtype, tuple(hidden.shape)) == adapter.hidden_spec(2, 10) == (torch.float64, (2, 10, 64))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["gpt2-tiny", "opt-tiny"])
def test_tied_weight_gradient_sums_across_copied_stages(name: str) -> None:
    model, _, adapter = load_model(name, seed=0, dtype=torch.float64)
    batch = make_batch(adapter, adapter.config.vocab_size)
    reference = split(adapter, model, [])[0]
    reference(None, batch).backward()
    stages = split(adapter, model, [2], copy_parameters=True)
    first, last = stages
    (tied_name,) = first.tied_parameters()
    assert set(last.tied_parameters()) == {tied_name}
    assert first.tied_parameters()[tied_name] is not last.tied_parameters()[tied_name]
    hidden = first(None, batch)
    sent = hidden.detach().requires_grad_()
    last(sent, batch).backward()
    hidden.backward(sent.grad)
    first_grad, last_grad = first.tied_parameters()[tied_name].grad, last.tied_parameters()[tied_name].grad
    full_grad = model.get_parameter(tied_name).grad
    assert first_grad is not None
    assert last_grad is not None
    assert full_grad is not None
    summed = first_grad + last_grad
    assert (summed - full_grad).abs().max() <= 1e-12
    # Each copy alone is wrong: the embedding and the LM head both contribute.
    assert (last_grad - summed).abs().max() > 1e-6


@pytest.mark.timeout(60)
def test_full_state_dict_loads_into_any_partition() -> None:
    source, _, adapter = load_model("gpt2-tiny", seed=1, dtype=torch.float64)
    target, _, _ = load_model("gpt2-tiny", seed=2, dtype=torch.float64)
    state = {n: p.detach() for n, p in source.named_parameters()}
    for stage in split(adapter, target, [3], copy_parameters=True):
        stage.load_full_state_dict(state)
        for full, param in stage.named_parameters_full():
            assert torch.equal(param, state[full])
    with pytest.raises(JobError, match="no tensor"):
        split(adapter, target, [3])[0].load_full_state_dict({})


@pytest.mark.timeout(60)
def test_presets_are_seeded() -> None:
    a, _, adapter_a = load_model("gpt2-tiny", seed=3)
    b, _, _ = load_model("gpt2-tiny", seed=3)
    c, _, _ = load_model("gpt2-tiny", seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.get_parameter("transformer.wte.weight"), c.get_parameter("transformer.wte.weight"))
    assert adapter_a.config.vocab_size == 256
    assert adapter_a.config.n_layer == 4
    assert adapter_a.config.n_positions == 64


@pytest.mark.timeout(60)
def test_minilm_has_real_weights_and_a_seeded_classifier() -> None:
    a, tokenizer, adapter = load_model("minilm", seed=5)
    b, _, _ = load_model("minilm", seed=5)
    c, _, _ = load_model("minilm", seed=6)
    assert tokenizer is not None
    assert adapter.num_blocks(a) == 6
    assert sum(p.numel() for p in a.parameters()) == pytest.approx(22.7e6, rel=0.01)
    assert torch.equal(a.get_parameter("classifier.weight"), b.get_parameter("classifier.weight"))
    assert not torch.equal(a.get_parameter("classifier.weight"), c.get_parameter("classifier.weight"))
    assert torch.equal(
        a.get_parameter("bert.embeddings.word_embeddings.weight"),
        c.get_parameter("bert.embeddings.word_embeddings.weight"),
    )


@pytest.mark.timeout(60)
def test_load_model_from_a_saved_folder(tmp_path: Path) -> None:
    model, _, _ = load_model("opt-tiny", seed=0)
    model.save_pretrained(tmp_path / "opt")  # type: ignore[operator]  # a transformers model, typed as nn.Module
    loaded, tokenizer, adapter = load_model(str(tmp_path / "opt"), seed=9)
    assert tokenizer is None
    assert type(adapter).__name__ == "OPTAdapter"
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.timeout(30)
def test_load_model_errors_are_sentences(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="no model folder"):
        load_model(str(tmp_path / "missing"), seed=0)
    with pytest.raises(JobError, match=r"no config\.json"):
        load_model(str(tmp_path), seed=0)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(JobError, match="t5"):
        load_model(str(tmp_path), seed=0)
    with pytest.raises(JobError, match="cannot split"):
        adapter_for(nn.Linear(2, 2))
