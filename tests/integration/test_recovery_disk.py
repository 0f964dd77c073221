"""A full disk pauses the job with a clear reason, leaves no partial checkpoint marked complete, and the
job goes on — losing nothing — once there is room again. The checkpoint directories live on a small tmpfs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.reference import max_param_gap, reference_run, write_text_data
from tests.integration.rig import Household, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 60


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.timeout(400)
def test_full_disk_pauses_then_resumes_with_nothing_lost(tmp_path: Path, tmpfs: Path) -> None:
    data = write_text_data(tmp_path / "text.jsonl")
    output = tmp_path / "out"
    per_daemon = [{"training": {"checkpoint_dir": str(tmpfs / f"dev{i}")}} for i in range(3)]
    with Household.create(tmp_path / "house", 3, extra={"training": {"worker_threads": 1}},
                          per_daemon=per_daemon) as household:
        household.start_all()
        wait_until(household.agreed_coordinator, 20, what="a coordinator")
        submitter = household.daemons[0]
        process = submitter.submit("--model", "gpt2-tiny", "--data", str(data), "--steps", str(STEPS), "--batch", "8",
                                   "--micro-batches", "4", "--seq-len", "16", "--lr", "1e-4", "--seed", "3",
                                   "--parallelism", "pipeline", "--devices", "3", "--checkpoint-every", "5",
                                   "--output", str(output))
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
        job_id = first["job"]["job_id"]
        wait_until(lambda: submitter.job(job_id)["checkpoints"], 60, interval=0.05, what="a first checkpoint")
        filler = tmpfs / "filler"
        # Fill the disk up: the next checkpoint cannot fit.
        with filler.open("wb", buffering=0) as stream, contextlib.suppress(OSError):
            while True:
                stream.write(b"\0" * 65536)
        assert shutil.disk_usage(tmpfs).free < 65536
        job = wait_until(lambda: (j := submitter.job(job_id))["state"] == "paused" and j, 60, interval=0.05,
                         what="the job to pause")
        assert "no space left" in job["reason"], job["reason"]
        paused = [line for line in submitter.log_path.read_text().splitlines() if f"job {job_id} paused: " in line]
        assert paused, submitter.log()
        assert "no space left on device" in paused[0], paused[0]
        # Nothing incomplete is marked complete: every manifest on the disk names shards that verify.
        from cetd.runtime.checkpoint import complete_checkpoints, verify

        for manifest in complete_checkpoints(tmpfs / "dev0", job_id):
            assert verify(manifest, tmpfs / "dev0") == []
        filler.unlink()
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        events = [first, *(json.loads(line) for line in stdout.splitlines() if line.strip())]
        assert f"job {job_id} goes on at step " in submitter.log_path.read_text(), submitter.log()
    ref_losses, ref_state, _ = reference_run("gpt2-tiny", data, steps=STEPS, seed=3)
    steps = [e for e in events if e.get("event") == "step"]
    assert {e["step"] for e in steps} == set(range(1, STEPS + 1))
    assert max(abs(e["loss"] - ref_losses[e["step"] - 1]) for e in steps) <= 1e-5
    assert max_param_gap(output, ref_state, causal=True) <= 1e-5
