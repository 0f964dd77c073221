"""A job's launch through the coordinator when the household elects another one meanwhile.

The retry logic is isolated here with a stand-in household (who coordinates, at which term) and stand-in
coordinators; the refusal itself (`Election.validate_command`'s stale term, carried over gRPC as
FAILED_PRECONDITION) is tested in `tests/cluster/test_election.py` and the transport tests.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from cetd.daemon import jobs
from cetd.daemon.jobs import JobManager
from cetd.errors import StaleTermError, UnavailableError
from cetd.transport.job_types import LaunchResult


@dataclass
class _Household:
    """Who this device follows, and what each coordinator answers a launch with."""

    coordinator: str
    term: int
    answers: dict[str, list[Any]]
    asked: list[tuple[str, int]] = field(default_factory=list)

    def client(self, device_id: str) -> Any:
        async def launch(*_: Any) -> LaunchResult:
            self.asked.append((device_id, self.term))
            answer = self.answers[device_id].pop(0)
            if isinstance(answer, StaleTermError):
                # The refusing device heard of the newer coordinator first; this one hears of it a moment later.
                asyncio.get_running_loop().call_later(0.3, self._elect_next)
                raise answer
            assert isinstance(answer, LaunchResult)
            return answer

        return SimpleNamespace(launch=launch)

    def _elect_next(self) -> None:
        self.coordinator, self.term = chr(ord(self.coordinator) + 1), self.term + 1


def _manager(household: _Household) -> Any:
    """The parts of a `JobManager` that `launch_via_coordinator` uses, on ``household``."""

    class _Election:
        @property
        def coordinator_id(self) -> str:
            return household.coordinator

        @property
        def term(self) -> int:
            return household.term

    manager = SimpleNamespace(me="Z", _client=household.client, _node=SimpleNamespace(election=_Election()))
    manager._wait_for_coordinator = functools.partial(JobManager._wait_for_coordinator, manager)
    return manager


def _stale(device: str, term: int) -> StaleTermError:
    return StaleTermError(f"device {device} follows a newer coordinator (stale term {term} from A: following "
                          f"term {term + 1} of B)")


@pytest.mark.timeout(20)
def test_a_launch_refused_for_a_stale_term_goes_to_the_new_coordinator() -> None:
    done = LaunchResult(plan_json="{}", endpoints=(), term=3)
    household = _Household(coordinator="A", term=2, answers={"A": [_stale("D", 2)], "B": [done]})
    result = asyncio.run(JobManager.launch_via_coordinator(_manager(household), "job-1", "{}", "{}", set(), False))
    assert result is done
    # A refused; the next ask waited for this device to follow the new coordinator, and went to it.
    assert household.asked == [("A", 2), ("B", 3)]


@pytest.mark.timeout(20)
def test_a_coordinator_that_keeps_changing_gives_up_with_the_reason() -> None:
    household = _Household(coordinator="A", term=2, answers={
        "A": [_stale("D", 2)], "B": [_stale("D", 3)], "C": [_stale("D", 4)]})
    with pytest.raises(UnavailableError, match=r"changed coordinator 3 times while the job started; last: device D "
                                               r"follows a newer coordinator \(stale term 4"):
        asyncio.run(JobManager.launch_via_coordinator(_manager(household), "job-1", "{}", "{}", set(), False))
    assert [device for device, _ in household.asked] == ["A", "B", "C"]
    assert jobs.LAUNCH_TERMS == 3
