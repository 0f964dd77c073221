"""`cetctl train` and `cetctl plan` turn their flags into the `JobSpec` the daemons plan and run."""

from __future__ import annotations

from pathlib import Path

import pytest

from cetd.cli.cetctl import build_parser
from cetd.cli.train import spec_from_args
from cetd.errors import JobError
from cetd.runtime.spec import JobSpec, from_json, to_json


def _args(command: str, tmp_path: Path, *flags: str) -> list[str]:
    return [command, "--model", "gpt2-tiny", "--data", str(tmp_path / "texts.jsonl"), *flags]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("command", ["train", "plan"])
def test_replicas_reach_the_spec_and_survive_its_json(command: str, tmp_path: Path) -> None:
    args = build_parser().parse_args(_args(command, tmp_path, "--parallelism", "pipeline", "--devices", "4",
                                           "--replicas", "2"))
    spec = spec_from_args(args)
    assert (spec.parallelism, spec.devices, spec.replicas) == ("pipeline", 4, 2)
    assert from_json(JobSpec, to_json(spec)) == spec
    default = spec_from_args(build_parser().parse_args(_args(command, tmp_path)))
    assert default.replicas == 0  # the planner decides


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("flags", "reason"), [
    (["--parallelism", "data", "--replicas", "2"], "--replicas 2 copies a pipeline; it does not apply to --parallelism data"),
    (["--parallelism", "tensor", "--replicas", "3"], "it does not apply to --parallelism tensor"),
    (["--replicas", "2", "--sync-every", "4"], "--sync-every must be 1, not 4"),
    (["--replicas", "8", "--micro-batches", "4"], "--replicas 8 needs at least 8 micro-batches per step, not 4"),
    (["--replicas", "-1"], "--replicas must not be negative, not -1"),
])
def test_replicas_that_cannot_apply_are_refused_with_the_reason(flags: list[str], reason: str, tmp_path: Path) -> None:
    with pytest.raises(JobError) as refused:
        spec_from_args(build_parser().parse_args(_args("train", tmp_path, *flags)))
    assert reason in str(refused.value)
    assert "\n" not in str(refused.value)
