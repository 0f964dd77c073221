"""Distributed training through real daemons equals single-process training.

A household of four daemon processes on 127.0.0.1; each job is submitted with the real `cetctl train`
and runs in fresh worker processes that stream tensors over mutual TLS (pipelines, tensor and data
parallelism, and two copies of a 2-stage pipeline each on half of every batch). The losses it reports
and the model it writes (loaded back with plain `transformers`) are compared with the reference trainer
run in this test process on the same model, seed and data order.

Tolerance: 1e-5 absolute on every step's loss and every final parameter (float32, lr 1e-4). Splitting
a matrix product changes the order of float32 additions; AdamW turns those last-bit differences into
parameter differences of order lr × 1e-3, far below 1e-5 here.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.integration.reference import reference_run, write_pair_data, write_text_data
from tests.integration.rig import Household, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOLERANCE = 1e-5
STEPS = 20
# One checkpoint kept per job: a dozen jobs share these daemons' disks, at up to 0.26 GB a checkpoint.
COMMON = {"--steps": str(STEPS), "--batch": "8", "--micro-batches": "4", "--seq-len": "16", "--lr": "1e-4",
          "--seed": "3", "--keep-checkpoints": "1"}


@pytest.fixture(scope="module")
def household(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Household]:
    root = tmp_path_factory.mktemp("training")
    with Household.create(root, 4, extra={"training": {"worker_threads": 1}}) as house:
        house.start_all()
        wait_until(house.agreed_coordinator, 20, what="a coordinator")
        yield house


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"gpt2-tiny": write_text_data(root / "text.jsonl"), "minilm": write_pair_data(root / "pairs.jsonl")}


def train(household: Household, submitter: int, args: dict[str, str], output: Path) -> tuple[dict[str, Any], list[float]]:
    argv = ["train", *[x for pair in args.items() for x in pair], "--output", str(output)]
    result = household.daemons[submitter].cetctl(*argv, check=False, timeout=600)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    finished = events[-1]["job"] if events and events[-1]["event"] == "finished" else {}
    assert result.returncode == 0, f"{result.stderr}\n{household.logs()[-4000:]}"
    losses = [e["loss"] for e in events if e["event"] == "step"]
    return finished, losses


CASES = [
    ("pipeline", 2, "gpipe"), ("pipeline", 2, "1f1b"), ("pipeline", 3, "gpipe"), ("pipeline", 3, "1f1b"),
    ("tensor", 2, "1f1b"), ("data", 2, "1f1b"),
]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("model_name", ["gpt2-tiny", "minilm"])
@pytest.mark.parametrize(("parallelism", "devices", "schedule"), CASES)
def test_distributed_training_matches_single_process(
    household: Household, data: dict[str, Path], tmp_path: Path, model_name: str, parallelism: str, devices: int,
    schedule: str,
) -> None:
    args = {"--parallelism": parallelism, "--devices": str(devices), "--schedule": schedule}
    plan = train_and_compare(household, data, tmp_path, model_name, args, label=f"{parallelism}×{devices} {schedule}")
    assert plan["parallelism"] == parallelism
    assert len(plan["workers"]) == devices


@pytest.mark.timeout(900)
@pytest.mark.parametrize("model_name", ["gpt2-tiny", "minilm"])
def test_pipeline_replicas_match_single_process(
    household: Household, data: dict[str, Path], tmp_path: Path, model_name: str
) -> None:
    """Two copies of a 2-stage pipeline, each on half of every batch, on the household's four devices."""
    args = {"--parallelism": "pipeline", "--devices": "4", "--replicas": "2"}
    plan = train_and_compare(household, data, tmp_path, model_name, args, label="pipeline×4 as 2 replicas")
    assert plan["parallelism"] == "pipeline"
    assert sorted((w["dp_index"], w["stage"]) for w in plan["workers"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    bounds = {r: [(w["start_block"], w["end_block"]) for w in sorted(plan["workers"], key=lambda w: w["stage"])
                  if w["dp_index"] == r] for r in (0, 1)}
    assert bounds[0] == bounds[1], "the replicas split the blocks alike"
    assert "pipeline × 2 replicas" in plan["reason"]


def train_and_compare(household: Household, data: dict[str, Path], tmp_path: Path, model_name: str,
                      args: dict[str, str], *, label: str) -> dict[str, Any]:
    """Train through the daemons with ``args``; assert it matches the reference; return the job's plan."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    ref_losses, ref_state, ref_model = reference_run(model_name, data[model_name], steps=STEPS,
                                                     seed=int(COMMON["--seed"]))
    output = tmp_path / "out"
    args = {**COMMON, "--model": model_name, "--data": str(data[model_name]), **args}
    job, losses = train(household, submitter=len(household.daemons) - 1, args=args, output=output)
    plan: dict[str, Any] = job["plan"]
    devices = len(plan["workers"])
    assert len({w["device_id"] for w in plan["workers"]}) == devices, "each share on its own device"
    assert job["seconds_per_sample"] > 0
    assert job["joules_per_sample"] > 0
    # Every device's J/sample covers its training; what its processes used to start (importing torch,
    # building and taking its share, seconds of CPU) is reported apart, also from remote devices.
    energy = job["energy"]
    assert {w["device_id"] for w in plan["workers"]} <= set(energy)
    assert sum(row["joules"] for row in energy.values()) / (STEPS * 8) == pytest.approx(job["joules_per_sample"])
    for device_id, row in energy.items():
        assert row["startup_cpu_seconds"] > 0.3, device_id
        assert row["startup_joules"] > 0, device_id

    assert len(losses) == STEPS
    loss_gap = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
    auto = AutoModelForCausalLM if model_name.startswith("gpt2") else AutoModelForSequenceClassification
    trained = auto.from_pretrained(output, local_files_only=True, attn_implementation="eager")
    state = trained.state_dict()
    param_gap = max(
        (state[name].float() - value.float()).abs().max().item() for name, value in ref_state.items()
    )
    # The exported folder, loaded with plain transformers, computes the trained model's logits.
    trained.eval()
    ids = torch.randint(5, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logit_gap = (trained(input_ids=ids).logits - ref_model(input_ids=ids).logits).abs().max().item()
    print(f"\n[equivalence] {model_name} {label}: max |Δloss| {loss_gap:.2e}, "
          f"max |Δparam| {param_gap:.2e}, max |Δlogit| {logit_gap:.2e}")
    assert logit_gap <= TOLERANCE
    assert all(math.isfinite(x) for x in losses)
    assert loss_gap <= TOLERANCE
    assert param_gap <= TOLERANCE
    assert losses[-1] < losses[0], "training must make progress"
    return plan


def test_cli_without_daemon_fails_cleanly(tmp_path: Path) -> None:
    result = subprocess.run(["python", "-m", "cetd.cli.cetctl", "--state-dir", str(tmp_path), "jobs"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
