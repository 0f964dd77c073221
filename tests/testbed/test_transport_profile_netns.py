"""The transport profile against an echo on another device, with the devices on separate machines.

Two daemons on separate hosts that also tell each other apart as machines (each its own kernel boot ID):
the coordinator profiles them at the same time, each refuses to echo while it measures, and each must still
end up timing its messages against the other — the first to wait for an echo lends itself as the other's
echo, and is echoed in turn — not fall back to an echo on its own device, which shares its CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cetd.daemon.shape_profiles import RETIMED_DIR, TIMINGS
from tests.integration.reference import write_text_data
from tests.integration.rig import Household, wait_until

from .netns import NetnsRig, requires_root

pytestmark = [pytest.mark.netns, pytest.mark.slow, requires_root]


def _profiles(state_dir: Path, folder: str = "profiles") -> list[dict[str, object]]:
    return [json.loads(path.read_text()) for path in sorted((state_dir / folder).glob("*.json"))]


def _retimed(state_dir: Path) -> list[dict[str, object]]:
    """The block and the transport timed again, after each shape's profile (`TIMINGS` in all)."""
    return _profiles(state_dir, f"profiles/{RETIMED_DIR}")


@pytest.mark.timeout(480)
def test_devices_profiled_at_once_echo_each_other(tmp_path: Path) -> None:
    data = write_text_data(tmp_path / "text.jsonl")
    with NetnsRig(2) as rig:
        prefixes = [rig.machine_argv(host, tmp_path) for host in rig.hosts]
        with Household.create(tmp_path / "house", 2, hosts=[h.ip for h in rig.hosts], prefixes=prefixes,
                              extra={"training": {"worker_threads": 1}, "device": {"profile": True}}) as house:
            house.start_all()
            wait_until(house.agreed_coordinator, 20, interval=0.3, what="a coordinator")
            args = ["plan", "--model", "gpt2-tiny", "--data", str(data), "--batch", "8", "--micro-batches", "4",
                    "--parallelism", "data", "--devices", "2"]
            first = json.loads(house.daemons[0].cetctl(*args, "--seq-len", "16", timeout=400).stdout)["prediction"]
            assert set(first["speed_source"].values()) == {"measured"}
            for daemon in house.daemons:
                stored = _profiles(daemon.state_dir)
                assert [s["echo"] for s in stored] == ["remote"], daemon.log()
                assert stored[0]["times"]["message_seconds"] > 0  # type: ignore[index]
                # Before the plan, each device timed its transport again until its median had enough timings,
                # each against the other device too.
                again = _retimed(daemon.state_dir)
                assert [s["echo"] for s in again] == ["remote"] * (TIMINGS - 1), daemon.log()
                assert all(s["times"]["message_seconds"] > 0 for s in again)  # type: ignore[index]
                assert all(s["block"] is True and s["times"]["block_seconds"] > 0 for s in again)  # type: ignore[index]
            # They were profiled at once (two machines): one found the other measuring, and asked again.
            assert any("measures or echoes now" in d.log() for d in house.daemons)
            # Every echo ended and gave its device back: a second shape is measured, and echoed, again.
            again = json.loads(house.daemons[1].cetctl(*args, "--seq-len", "8", timeout=400).stdout)["prediction"]
            assert set(again["speed_source"].values()) == {"measured"}
            for daemon in house.daemons:
                assert [s["echo"] for s in _profiles(daemon.state_dir)] == ["remote", "remote"], daemon.log()
                # The transport has its timings: the new shape's block alone is timed again.
                again = _retimed(daemon.state_dir)
                assert len(again) == 2 * (TIMINGS - 1), daemon.log()
                second = [s for s in again if s["echo"] == ""]
                assert len(second) == TIMINGS - 1, again
                assert all(s["times"]["message_seconds"] == 0 for s in second)  # type: ignore[index]
                assert all(s["block"] is True and s["times"]["block_seconds"] > 0 for s in second)  # type: ignore[index]
