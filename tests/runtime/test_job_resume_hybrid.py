"""Checkpoints cross between pipeline × data hybrids and every other plan.

A hybrid's checkpoint holds one shard per worker, each replica's the same as the other's (the replicas
stay bit-identical); `read_full_state` takes one shard per stage, so the checkpoint loads into any plan.
gpt2-tiny in float64: 6 steps on 2 replicas × 2 stages (checkpoint at step 5), resumed on a plain 2-stage
pipeline and on one device, gives the losses of steps 6..12 and the final parameters of an uninterrupted
12-step run on a 3-stage pipeline to rounding (1e-12); so does a plain pipeline's checkpoint resumed on
a hybrid, and a hybrid checkpoint whose replica-0 shard is corrupt (replica 1's stands in).
"""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

import pytest
import torch

from cetd.runtime.checkpoint import latest_complete, load_full_state, shard_file_name, verify
from cetd.runtime.checkpoint_state import decode_shard
from cetd.runtime.job_protocol import pipeline_ranks, stage_replica_ranks
from cetd.runtime.spec import JobPlan
from tests.runtime.test_job_harness import make_plan, write_texts
from tests.runtime.test_job_hybrid import hybrid_plan
from tests.runtime.test_job_resume import (
    JOB,
    Outcome,
    assert_replicas_identical,
    first_part,
    job_spec,
    run_once,
    uninterrupted,
)

HYBRID = hybrid_plan(2, [(0, 2), (2, 4)], micro=4, ranks_by_stage=True)


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_texts(tmp_path_factory.mktemp("resume-hybrid-data") / "texts.jsonl")


@cache
def hybrid_first_part(data: Path) -> Path:
    """6 float64 steps on the hybrid (checkpoint at step 5); returns the checkpoint directory."""
    directory = data.parent / "hybrid-first-part"
    outcome = run_once(job_spec(data, steps=6, precision="float64"), HYBRID, directory)
    assert outcome.error is None
    assert [m.step for m in outcome.manifests] == [5]
    return directory


def resume_and_compare(texts: Path, directory: Path, plan: JobPlan, name: str) -> tuple[float, float]:
    manifest = latest_complete(directory / "driver", JOB)
    assert manifest is not None
    state = load_full_state(manifest, directory / "driver")
    assert state.step == 5
    spec = job_spec(texts, steps=12, precision="float64")
    resumed = run_once(spec, plan, texts.parent / f"resumed-{name}", resume=state, term=1)
    assert resumed.error is None
    assert resumed.result is not None
    assert [r.step for r in resumed.reports] == list(range(6, 13))
    # Steps 1..5 come from the manifest, as that run computed them.
    assert resumed.result.losses[:5] == list(manifest.losses)
    return differences(resumed, uninterrupted(texts, "float64"))


def differences(resumed: Outcome, expected: Outcome) -> tuple[float, float]:
    """(largest loss difference over all 12 steps, largest final parameter difference).

    Over every step, not only the resumed ones: a hybrid adds its gradients in another order than the
    uninterrupted 3-stage pipeline, so even the losses before the checkpoint may differ in the last bit.
    """
    assert resumed.result is not None
    assert expected.result is not None
    assert len(resumed.result.losses) == len(expected.result.losses) == 12
    loss = max(abs(a - b) for a, b in zip(resumed.result.losses, expected.result.losses, strict=True))
    assert set(resumed.parameters) == set(expected.parameters)
    params = max(
        float((resumed.parameters[n].double() - p.double()).abs().max()) for n, p in expected.parameters.items()
    )
    return loss, params


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("name", "plan"),
    [("pipeline", make_plan("pipeline", 2, num_blocks=4)), ("single", make_plan("single", 1, num_blocks=4))],
)
def test_a_hybrid_checkpoint_resumes_on_a_plain_pipeline_or_one_device(texts: Path, name: str, plan: JobPlan) -> None:
    directory = hybrid_first_part(texts)
    manifest = latest_complete(directory / "driver", JOB)
    assert manifest is not None
    assert manifest.plan == HYBRID
    assert sorted(shard.rank for shard in manifest.shards) == [1, 2, 3, 4]
    assert verify(manifest, directory / "driver") == []
    assert_replicas_identical(directory, manifest)
    for stage in (0, 1):  # the replicas of a stage saved the very same parameters and AdamW state
        (_, one), (_, other) = (
            decode_shard((manifest.folder / shard_file_name(r)).read_bytes())
            for r in stage_replica_ranks(HYBRID, stage)
        )
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            assert one[kind].keys() == other[kind].keys()
            assert all(torch.equal(one[kind][n], other[kind][n]) for n in one[kind])
    loss, params = resume_and_compare(texts, directory, plan, f"from-hybrid-{name}")
    print(f"\n[resume] hybrid → {name}: |Δloss| {loss:.2e}, |Δparam| {params:.2e}")
    assert loss <= 1e-12
    assert params <= 1e-12


@pytest.mark.timeout(120)
def test_a_plain_pipeline_checkpoint_resumes_on_a_hybrid(texts: Path) -> None:
    loss, params = resume_and_compare(texts, first_part(texts, "float64"), HYBRID, "onto-hybrid")
    print(f"\n[resume] pipeline → hybrid: |Δloss| {loss:.2e}, |Δparam| {params:.2e}")
    assert loss <= 1e-12
    assert params <= 1e-12


@pytest.mark.timeout(120)
def test_a_corrupt_shard_of_one_replica_is_replaced_by_the_other_replicas(texts: Path, tmp_path: Path) -> None:
    source = hybrid_first_part(texts)
    directory = tmp_path / "copy"
    shutil.copytree(source, directory)
    manifest = latest_complete(directory / "driver", JOB)
    assert manifest is not None
    for rank in pipeline_ranks(HYBRID, 0):  # every shard of replica 0
        shard = manifest.folder / shard_file_name(rank)
        shard.write_bytes(b"\0" + shard.read_bytes()[1:])
    assert sorted(verify(manifest, directory / "driver")) == sorted(
        shard_file_name(r) for r in pipeline_ranks(HYBRID, 0)
    )
    loss, params = resume_and_compare(texts, directory, make_plan("pipeline", 2, num_blocks=4), "corrupt")
    assert loss <= 1e-12
    assert params <= 1e-12
