"""The transport profile against an echo on another device: two real daemons echo each other's profiles."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.reference import write_text_data
from tests.integration.rig import Household, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def household(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Household]:
    root = tmp_path_factory.mktemp("transport-profile")
    with Household.create(root, 2, extra={"training": {"worker_threads": 1}, "device": {"profile": True}}) as house:
        house.start_all()
        wait_until(house.agreed_coordinator, 20, what="a coordinator")
        yield house


@pytest.mark.timeout(420)
def test_each_device_times_its_messages_against_an_echo_on_the_other(household: Household,
                                                                     tmp_path: Path) -> None:
    # The coordinator asks both devices for gpt2-tiny's shapes. They share this machine, so they measure one
    # after another, and each asks the other — idle then — to echo its ping-pong over the real mutual-TLS
    # tensor transport: the cost of a message whose other end is on another device, as in a job.
    data = write_text_data(tmp_path / "text.jsonl")
    args = ["plan", "--model", "gpt2-tiny", "--data", str(data), "--batch", "8", "--micro-batches", "4",
            "--seq-len", "16", "--parallelism", "data", "--devices", "2"]
    prediction = json.loads(household.daemons[0].cetctl(*args, timeout=400).stdout)["prediction"]
    for daemon in household.daemons:
        cached = list((daemon.state_dir / "profiles").glob("*.json"))
        assert len(cached) == 1, cached
        stored = json.loads(cached[0].read_text())
        assert stored["echo"] == "remote", daemon.log()
        assert stored["times"]["message_seconds"] > 0
        assert stored["times"]["byte_seconds"] >= 0
        assert prediction["speed_source"][str(daemon.device_id)] == "measured"
        assert "(echo: remote)" in daemon.log()
    # Each echo ended with its profile and gave the device back: a second shape is measured (and echoed) again.
    again = json.loads(household.daemons[1].cetctl(*args[:-6], "--seq-len", "8", "--parallelism", "data",
                                                   "--devices", "2", timeout=400).stdout)["prediction"]
    assert set(again["speed_source"].values()) == {"measured"}
    for daemon in household.daemons:
        stored = [json.loads(path.read_text()) for path in (daemon.state_dir / "profiles").glob("*.json")]
        assert [s["echo"] for s in stored] == ["remote", "remote"], daemon.log()
