"""Running a whole job (driver + workers) on in-process ranks, and the job protocol's plan checks.

The helpers here are shared by the other ``test_job_*`` files: data files written to ``tmp_path``,
plans for each mode, one job run on threads with local channels, and the single-process reference.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import pytest

from cetd.errors import JobError
from cetd.runtime.data import load_dataset, make_batches, tokenizer_for
from cetd.runtime.driver import Driver, TrainingResult
from cetd.runtime.job_protocol import check_plan, loss_rank, worker_ranks
from cetd.runtime.local_channel import LocalPeerChannel, make_local_channels, run_on_local_ranks
from cetd.runtime.models import adapter_for
from cetd.runtime.models.loading import load_model
from cetd.runtime.reference import ReferenceRun, train_reference
from cetd.runtime.spec import JobPlan, JobSpec, ModelDescription, StepReport, WorkerAssignment, from_json, to_json
from cetd.runtime.worker import adamw_settings, run_worker, torch_dtype

_WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "tree",
    "house",
    "big",
    "small",
    "red",
    "blue",
    "quick",
    "lazy",
    "fox",
    "jumps",
    "over",
]


def write_texts(path: Path, count: int = 24, seed: int = 0) -> Path:
    """A JSONL file of short random sentences (``{"text": ...}`` per line)."""
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(rng.choices(_WORDS, k=rng.randint(2, 9)))}) for _ in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_pairs(path: Path, count: int = 24, seed: int = 0) -> Path:
    """A QNLI-style JSONL file of question / sentence / label triples."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        question = " ".join(rng.choices(_WORDS, k=rng.randint(2, 6))) + "?"
        sentence = " ".join(rng.choices(_WORDS, k=rng.randint(3, 10))) + "."
        label = rng.choice(["entailment", "not_entailment"])
        lines.append(json.dumps({"question": question, "sentence": sentence, "label": label}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_plan(parallelism: str, workers: int, *, num_blocks: int, schedule: str = "1f1b", micro: int = 4) -> JobPlan:
    """A plan of ``workers`` workers; pipeline stages get contiguous, near-even block ranges."""
    assignments = []
    for index in range(workers):
        rank = index + 1
        if parallelism == "pipeline":
            start = index * num_blocks // workers
            end = (index + 1) * num_blocks // workers
            assignments.append(
                WorkerAssignment(rank=rank, device_id=f"D{rank}", stage=index, start_block=start, end_block=end)
            )
        elif parallelism == "tensor":
            assignments.append(WorkerAssignment(rank=rank, device_id=f"D{rank}", tp_index=index))
        elif parallelism == "data":
            assignments.append(WorkerAssignment(rank=rank, device_id=f"D{rank}", dp_index=index))
        else:
            assignments.append(WorkerAssignment(rank=rank, device_id=f"D{rank}", end_block=num_blocks))
    return JobPlan(
        parallelism=parallelism,  # type: ignore[arg-type]  # test parameters are plain strings
        workers=tuple(assignments),
        schedule=schedule,  # type: ignore[arg-type]  # test parameters are plain strings
        micro_batches=micro,
    )


@dataclass
class JobRun:
    """What one distributed run produced."""

    result: TrainingResult
    reports: list[StepReport]
    driver: Driver
    description: ModelDescription
    channels: list[LocalPeerChannel] = field(default_factory=list)


def run_job(spec: JobSpec, plan: JobPlan, *, timeout: float = 60.0) -> JobRun:
    """Run ``spec`` under ``plan``: the driver on rank 0, each worker on its own thread."""
    driver = Driver(spec, recv_timeout=timedelta(seconds=timeout))
    description = driver.describe()
    # What the workers get has crossed a process boundary as JSON in the real daemon.
    wire_description = from_json(ModelDescription, to_json(description))
    reports: list[StepReport] = []

    def body(channel: LocalPeerChannel) -> TrainingResult | None:
        if channel.rank == 0:
            return driver.run(plan, channel, reports.append)
        run_worker(
            spec, plan, channel.rank, wire_description, channel, num_threads=1, recv_timeout=timedelta(seconds=timeout)
        )
        return None

    channels = make_local_channels(plan.world_size)
    results = run_on_local_ranks(plan.world_size, body, timeout=timedelta(seconds=timeout * 2), channels=channels)
    result = results[0]
    assert result is not None
    return JobRun(result, reports, driver, description, channels)


def run_reference(spec: JobSpec) -> ReferenceRun:
    """Single-process training of ``spec`` with the same model, data order and optimizer."""
    model, pretrained, adapter = load_model(spec.model, seed=spec.seed, dtype=torch_dtype(spec.precision))
    dataset = load_dataset(
        Path(spec.data),
        task=adapter.task,
        tokenizer=tokenizer_for(pretrained, model.config),
        seq_len=spec.seq_len,
        max_seq_len=adapter.max_seq_len(),
    )
    batches = make_batches(
        dataset, global_batch=spec.global_batch, micro_batches=spec.micro_batches, seed=spec.seed, steps=spec.steps
    )
    return train_reference(model, batches, settings=adamw_settings(spec), seed=spec.seed, adapter=adapter)


# --- the protocol's plan checks ---------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_worker_order_and_loss_rank_follow_the_plan() -> None:
    pipeline = make_plan("pipeline", 3, num_blocks=4)
    assert [(w.start_block, w.end_block) for w in pipeline.workers] == [(0, 1), (1, 2), (2, 4)]
    assert loss_rank(pipeline) == 3
    assert loss_rank(make_plan("tensor", 2, num_blocks=4)) == 1
    shuffled = JobPlan(
        parallelism="data",
        workers=(WorkerAssignment(rank=1, device_id="A", dp_index=1), WorkerAssignment(rank=2, device_id="B")),
    )
    assert worker_ranks(shuffled) == [2, 1]
    assert loss_rank(shuffled) == 2


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("plan", "reason"),
    [
        (make_plan("pipeline", 2, num_blocks=3), "cover 3 of the model's 4 blocks"),
        (
            JobPlan(
                parallelism="pipeline",
                workers=(
                    WorkerAssignment(rank=1, device_id="A", stage=0, start_block=0, end_block=2),
                    WorkerAssignment(rank=2, device_id="B", stage=1, start_block=3, end_block=4),
                ),
            ),
            "stage 1 holds blocks [3, 4)",
        ),
        (make_plan("tensor", 5, num_blocks=4), "exceed the model's 4 attention heads"),
        (replace(make_plan("tensor", 2, num_blocks=4), ring_min_bytes=0), "ring threshold of 0 bytes"),
        (make_plan("single", 2, num_blocks=4), "names 2 workers"),
        (JobPlan(parallelism="data", workers=(WorkerAssignment(rank=2, device_id="A"),)), "not 1..N"),
    ],
)
def test_plans_that_do_not_fit_are_refused(plan: JobPlan, reason: str) -> None:
    with pytest.raises(JobError, match=reason.replace("[", r"\[").replace(")", r"\)")):
        check_plan(plan, num_blocks=4, num_heads=4, world_size=plan.world_size)


@pytest.mark.timeout(10)
def test_a_plan_for_another_world_size_is_refused() -> None:
    with pytest.raises(JobError, match="needs 3 ranks but the job's channel has 2"):
        check_plan(make_plan("data", 2, num_blocks=4), num_blocks=4, num_heads=4, world_size=2)


def differences(run: JobRun, expected: ReferenceRun, steps: int) -> tuple[float, float]:
    """(largest loss difference over the ``steps`` steps, largest final parameter difference) against the
    reference trainer."""
    model = run.driver.model
    adapter = adapter_for(model)
    whole = adapter.make_stage(model, 0, adapter.num_blocks(model), first=True, last=True)
    trained = {name: p.detach() for name, p in whole.named_parameters_full()}
    assert set(trained) == set(expected.state_dict)
    assert len(run.result.losses) == len(expected.losses) == steps
    loss = max(abs(a - b) for a, b in zip(run.result.losses, expected.losses, strict=True))
    params = max(float((trained[n].double() - p.double()).abs().max()) for n, p in expected.state_dict.items())
    return loss, params
