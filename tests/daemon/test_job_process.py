"""A job process's CPU account: what it used to start is kept apart from what it used while training."""

from __future__ import annotations

from pathlib import Path

import pytest

from cetd.daemon.job_process import JobProcess


@pytest.mark.timeout(10)
def test_start_up_cpu_is_kept_apart_from_training(tmp_path: Path) -> None:
    process = JobProcess(name="a worker", log_path=tmp_path / "w.log")
    process.note_cpu_seconds(2.5)  # imports and the share's weights
    process.mark_training(2.5)
    process.note_cpu_seconds(3.0)
    assert process.startup_cpu_seconds == 2.5
    assert process.training_cpu_seconds() == pytest.approx(0.5)
    assert process.take_cpu_seconds() == pytest.approx(0.5)  # the driver's per-incarnation account, too
    process.mark_training(2.9)  # a second mark (a later incarnation) moves nothing
    process.note_cpu_seconds(4.0)
    assert process.startup_cpu_seconds == 2.5
    assert process.training_cpu_seconds() == pytest.approx(1.5)
    assert process.take_cpu_seconds() == pytest.approx(1.0)


@pytest.mark.timeout(10)
def test_a_process_that_never_trained_only_started(tmp_path: Path) -> None:
    process = JobProcess(name="a worker", log_path=tmp_path / "w.log")
    process.note_cpu_seconds(1.75)
    assert process.startup_cpu_seconds == 1.75
    assert process.training_cpu_seconds() == 0.0
