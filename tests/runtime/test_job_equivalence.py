"""A whole gpt2-tiny job (driver + workers on local channels) trains exactly like one process.

Every mode (pipeline 2 and 3 stages under GPipe and 1F1B, tensor 2, data 2, single) reproduces
`train_reference` with the same seed and data order: each step's loss and the final parameters within
1e-5 in float32, and to ~1e-13 in float64, which shows the remaining float32 differences are only the
order of additions (tensor parallelism splits matrix products; data parallelism and the tied embedding
sum gradients in another order). The output folder is a normal Hugging Face model.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from cetd.runtime.models import adapter_for
from cetd.runtime.reference import ReferenceRun
from cetd.runtime.spec import JobSpec
from tests.runtime.test_job_harness import differences, make_plan, run_job, run_reference, write_texts

STEPS = 20
CASES = [
    ("pipeline", 2, "gpipe"),
    ("pipeline", 2, "1f1b"),
    ("pipeline", 3, "gpipe"),
    ("pipeline", 3, "1f1b"),
    ("tensor", 2, "1f1b"),
    ("data", 2, "1f1b"),
    ("single", 1, "1f1b"),
]


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_texts(tmp_path_factory.mktemp("job-data") / "texts.jsonl")


def job_spec(data: Path, *, precision: str = "float32", output: str = "") -> JobSpec:
    return JobSpec(
        model="gpt2-tiny",
        data=str(data),
        output=output,
        steps=STEPS,
        global_batch=8,
        micro_batches=4,
        seq_len=16,
        lr=1e-4,
        seed=3,
        precision=precision,  # type: ignore[arg-type]  # a test parameter
    )


@cache
def reference(spec: JobSpec) -> ReferenceRun:
    return run_reference(spec)




@pytest.mark.timeout(60)
@pytest.mark.parametrize(("parallelism", "workers", "schedule"), CASES)
def test_float32_job_matches_the_reference(texts: Path, parallelism: str, workers: int, schedule: str) -> None:
    spec = job_spec(texts)
    run = run_job(spec, make_plan(parallelism, workers, num_blocks=4, schedule=schedule))
    loss, params = differences(run, reference(spec), STEPS)
    # Measured (loss / parameters): pipeline 1.2e-7 / 5.1e-7, tensor 3.6e-7 / 8.2e-7, data 1.2e-7 / 6.1e-7,
    # single 0 / 0. Float64: ~9e-16 / ~1e-14 (see below).
    assert loss <= 1e-5
    assert params <= 1e-5
    if parallelism == "single":
        assert loss == 0.0
        assert params == 0.0
    assert run.result.losses[-1] < run.result.losses[0] - 0.2  # it does learn
    assert [r.step for r in run.reports] == list(range(1, STEPS + 1))
    assert [r.loss for r in run.reports] == run.result.losses
    assert all(r.samples == 8 and r.seconds > 0 for r in run.reports)
    assert run.result.samples == STEPS * 8
    assert run.result.output == ""
    assert run.channels[0].undelivered() == []  # nothing sent that nobody received


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("parallelism", "workers"), [("tensor", 2), ("data", 2), ("pipeline", 3)])
def test_float64_job_matches_the_reference_to_rounding(texts: Path, parallelism: str, workers: int) -> None:
    spec = job_spec(texts, precision="float64")
    run = run_job(spec, make_plan(parallelism, workers, num_blocks=4))
    loss, params = differences(run, reference(spec), STEPS)
    assert loss <= 1e-12
    assert params <= 1e-11


@pytest.mark.timeout(120)
def test_four_way_tensor_parallel_matches_the_reference_either_way_it_all_reduces(texts: Path) -> None:
    """The planner picks per job whether activations go round a ring or are exchanged whole
    (`JobPlan.ring_min_bytes`); both sum in another order than one process, and both must train alike.
    In float64 the difference is rounding alone."""
    spec = job_spec(texts, precision="float64")
    sent = {}
    for name, threshold in (("ring", 1), ("whole", 2**30)):
        run = run_job(spec, replace(make_plan("tensor", 4, num_blocks=4), ring_min_bytes=threshold))
        loss, params = differences(run, reference(spec), STEPS)
        assert loss <= 1e-12, name
        assert params <= 1e-11, name
        assert run.channels[0].undelivered() == []
        sent[name] = run.channels[1].bytes_sent
    # Each activation all-reduce sends 3 whole copies, or 6 quarters round the ring.
    assert sent["whole"] > 1.5 * sent["ring"]


@pytest.mark.timeout(60)
def test_output_folder_loads_with_transformers_and_gives_the_same_logits(texts: Path, tmp_path: Path) -> None:
    spec = job_spec(texts, output=str(tmp_path / "tuned"))
    run = run_job(spec, make_plan("pipeline", 2, num_blocks=4))
    assert run.result.output == str(tmp_path / "tuned")
    assert (tmp_path / "tuned" / "config.json").is_file()
    loaded: Any = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", local_files_only=True)
    loaded.eval()
    model: Any = run.driver.model
    adapter = adapter_for(model)
    whole = adapter.make_stage(model, 0, adapter.num_blocks(model), first=True, last=True)
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, 256, (3, 16), generator=generator)
    mask = torch.ones(3, 16, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": mask}
    with torch.no_grad():
        expected = whole.logits(None, batch)
        got = loaded(input_ids=input_ids, attention_mask=mask).logits
    assert got.shape == expected.shape == (3, 16, 256)
    assert float((got - expected).abs().max()) <= 1e-5
    # The weights are the trained ones, not the initial ones.
    assert not torch.equal(loaded.transformer.wte.weight, run_reference_initial_wte())
    # Tied weights stay tied in the export.
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def run_reference_initial_wte() -> torch.Tensor:
    from cetd.runtime.models.loading import load_model

    model, _, _ = load_model("gpt2-tiny", seed=3)
    weight: torch.Tensor = model.get_parameter("transformer.wte.weight").detach()
    return weight
