"""Bad jobs fail with one clear sentence; every daemon stays healthy and runs the next job."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from tests.integration.rig import Household, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def household(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Household]:
    root = tmp_path_factory.mktemp("errors")
    with Household.create(root, 3, extra={"training": {"worker_threads": 1}}) as house:
        house.start_all()
        wait_until(house.agreed_coordinator, 20, what="a coordinator")
        yield house


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": f"sample number {i} of the data"}) + "\n" for i in range(40)))
    return path


def train(household: Household, *args: str) -> tuple[int, str, list[dict[str, object]]]:
    result = household.daemons[0].cetctl("train", "--steps", "4", "--batch", "4", "--micro-batches", "2",
                                         "--seq-len", "16", *args, check=False, timeout=300)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return result.returncode, result.stderr.strip(), events


def assert_healthy(household: Household) -> None:
    for daemon in household.daemons:
        assert daemon.alive(), daemon.log()
    assert household.agreed_coordinator() is not None


@pytest.mark.timeout(300)
def test_bad_inputs_are_refused_with_a_reason(household: Household, text: Path, tmp_path: Path) -> None:
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"text": "fine"}\n{"text": "also fine"}\nthis is not json\n')
    cases = [
        (["--model", "gpt2-tiny", "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--model", "gpt2-tiny", "--data", str(malformed)], "line 3"),
        (["--model", str(tmp_path / "no-such-model"), "--data", str(text)], "no-such-model"),
        (["--model", "gpt2-tiny", "--data", str(text), "--seq-len", "4096"], "4096"),
        (["--model", "gpt2-tiny", "--data", str(text), "--batch", "5"], "micro-batches"),
    ]
    for args, expected in cases:
        code, stderr, _ = train(household, *args)
        assert code == 65, (args, stderr)
        assert expected in stderr, (args, stderr)
        assert "Traceback" not in stderr
        assert len(stderr.splitlines()) == 1, stderr
    jobs = json.loads(household.daemons[0].cetctl("jobs").stdout)
    refused = [j for j in jobs if j["state"] == "failed"]
    assert len(refused) >= 4  # those that reached the daemon are recorded as failed with their reason
    assert all(j["reason"] for j in refused)
    assert_healthy(household)
    # ...and the household still trains.
    code, stderr, events = train(household, "--model", "gpt2-tiny", "--data", str(text), "--parallelism",
                                 "pipeline", "--devices", "2")
    assert code == 0, stderr
    assert events[-1]["job"]["state"] == "succeeded"


@pytest.mark.timeout(300)
def test_nan_loss_fails_the_job_naming_the_step(household: Household, text: Path) -> None:
    code, stderr, events = train(household, "--model", "gpt2-tiny", "--data", str(text), "--parallelism",
                                 "pipeline", "--devices", "2", "--lr", "1e30")
    assert code == 65, stderr
    assert "at step" in stderr
    assert "nan" in stderr.lower() or "inf" in stderr.lower()
    finished = events[-1]["job"]
    assert finished["state"] == "failed"
    assert_healthy(household)
    # Every driver and worker process of the job is gone.
    def no_job_processes() -> bool:
        return all(not psutil.Process(d.proc.pid).children(recursive=True) for d in household.daemons if d.proc)

    wait_until(no_job_processes, 10, what="job processes reaped")
    code, stderr, _ = train(household, "--model", "gpt2-tiny", "--data", str(text), "--parallelism", "data",
                            "--devices", "2")
    assert code == 0, stderr


@pytest.mark.timeout(600)
def test_a_model_no_device_can_train_alone_trains_over_four(tmp_path: Path, text: Path) -> None:
    """Each device's memory is capped (config) below what training GPT-2 small on one device needs, but
    above a quarter share: single-device training is refused with the reason, pipeline and tensor
    parallelism over four devices train it."""
    import torch

    from cetd.cluster.planner import DeviceOffer, plan_job
    from cetd.runtime.driver import Driver
    from cetd.runtime.spec import JobSpec

    torch.set_num_threads(1)
    spec = JobSpec(model="gpt2-small", data=str(text), steps=2, global_batch=4, micro_batches=2, seq_len=16)
    description = Driver(spec).describe()
    roomy = [DeviceOffer(device_id=f"d{i}", memory_bytes=64 * 1024**3, cores=2) for i in range(4)]
    whole = plan_job(replace(spec, parallelism="single"), description, roomy).estimated_memory_bytes["d0"]
    shares = [
        max(plan_job(replace(spec, parallelism=p, devices=4), description, roomy).estimated_memory_bytes.values())
        for p in ("pipeline", "tensor")
    ]
    cap = (whole + max(shares)) // 2
    print(f"\n[memory] gpt2-small: one device needs {whole / 2**30:.2f} GiB, largest quarter share "
          f"{max(shares) / 2**30:.2f} GiB; each device capped at {cap / 2**30:.2f} GiB")
    assert max(shares) < cap < whole
    common = ("--model", "gpt2-small", "--data", str(text), "--steps", "2")
    with Household.create(tmp_path, 4, extra={"training": {"worker_threads": 1},
                                              "device": {"memory_limit_bytes": cap}}) as house:
        house.start_all()
        wait_until(house.agreed_coordinator, 20, what="a coordinator")
        code, stderr, _ = train(house, *common, "--parallelism", "single")
        assert code == 65
        assert "to train on one device" in stderr
        assert "pipeline or tensor" in stderr
        for parallelism in ("pipeline", "tensor"):
            code, stderr, events = train(house, *common, "--parallelism", parallelism, "--devices", "4")
            assert code == 0, stderr
            job = events[-1]["job"]
            assert len(job["plan"]["workers"]) == 4
            assert max(job["plan"]["estimated_memory_bytes"].values()) <= cap


@pytest.mark.timeout(300)
def test_cancel_stops_the_job_everywhere(household: Household, text: Path) -> None:
    submitter = household.daemons[0]
    process = submitter.submit("--model", "gpt2-tiny", "--data", str(text), "--steps", "100000", "--batch", "4",
                               "--micro-batches", "2", "--seq-len", "16", "--parallelism", "pipeline", "--devices",
                               "3")
    assert process.stdout is not None
    job_id = json.loads(process.stdout.readline())["job"]["job_id"]
    wait_until(lambda: submitter.job(job_id)["steps_done"] >= 2, 120, interval=0.1, what="the job to run")
    # Cancelled from another member: forwarded to the submitter.
    cancelled = json.loads(household.daemons[1].cetctl("cancel", job_id).stdout)
    assert cancelled["state"] == "cancelled"
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "cancelled" in stderr

    def no_job_processes() -> bool:
        return all(not psutil.Process(d.proc.pid).children(recursive=True) for d in household.daemons if d.proc)

    wait_until(no_job_processes, 15, what="every job process stopped")
    assert_healthy(household)


@pytest.mark.timeout(300)
def test_a_peer_sending_a_wrong_shape_fails_the_job_with_the_reason(tmp_path: Path, text: Path) -> None:
    """Two devices run a (fault-injected) worker that sends activations one position short; the receiving
    stage refuses them, the job fails with that sentence instead of being retried, the household lives."""
    with Household.create(tmp_path, 3, extra={"training": {"worker_threads": 1}}) as house:
        for daemon in house.daemons[1:]:
            daemon.env["CETD_FAULT"] = "truncate-activations"
        house.start_all()
        wait_until(house.agreed_coordinator, 20, what="a coordinator")
        code, stderr, events = train(house, "--model", "gpt2-tiny", "--data", str(text), "--parallelism",
                                     "pipeline", "--devices", "3")
        assert code == 65, stderr
        assert "expected float32" in stderr, stderr
        assert events[-1]["job"]["state"] == "failed"
        assert not events[-1]["job"]["recoveries"], "a protocol violation is not retried elsewhere"
        assert_healthy(house)
