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

import grpc
import pytest

from cetd.daemon import jobs
from cetd.daemon.jobs import JobManager
from cetd.errors import StaleTermError, UnavailableError
from cetd.transport.auth import status_for
from cetd.transport.household_client import error_from_rpc
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


@pytest.mark.timeout(20)
def test_a_device_that_no_longer_coordinates_refuses_a_launch_as_a_stale_term() -> None:
    # The submitter still follows A, which has handed over: A says so in words that cross gRPC as a stale
    # term, so the submitter waits for the new coordinator and asks it (above), instead of failing the job.
    household = _Household(coordinator="A", term=2, answers={})
    with pytest.raises(StaleTermError, match="stale term: this device is not the coordinator") as refused:
        asyncio.run(JobManager.launch(_manager(household), "job-1", "{}", "{}", (), False, "Y"))
    rpc_error = grpc.aio.AioRpcError(status_for(refused.value), grpc.aio.Metadata(), grpc.aio.Metadata(),
                                     details=str(refused.value))
    assert isinstance(error_from_rpc(rpc_error, "A"), StaleTermError)
