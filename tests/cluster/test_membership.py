"""Failure detector: state thresholds, rejoin after death, snapshots, forgetting, config checks."""

from __future__ import annotations

from datetime import timedelta

import pytest

from cetd.cluster.membership import FailureDetectorConfig, MembershipTable, PeerState
from cetd.errors import ConfigError
from cetd.ids import DeviceId

A = DeviceId("AAAA")
B = DeviceId("BBBB")


@pytest.mark.timeout(10)
def test_default_config_matches_the_design() -> None:
    config = FailureDetectorConfig()
    assert config.heartbeat_interval == timedelta(seconds=0.5)
    assert config.suspect_after == timedelta(seconds=1.5)
    assert config.dead_after == timedelta(seconds=3.0)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("interval", "suspect", "dead"),
    [(0.0, 1.5, 3.0), (-1.0, 1.5, 3.0), (0.5, 0.5, 3.0), (0.5, 1.5, 1.5), (0.5, 2.0, 1.0)],
)
def test_config_rejects_inconsistent_timings(interval: float, suspect: float, dead: float) -> None:
    with pytest.raises(ConfigError):
        FailureDetectorConfig(
            heartbeat_interval=timedelta(seconds=interval),
            suspect_after=timedelta(seconds=suspect),
            dead_after=timedelta(seconds=dead),
        )


@pytest.mark.timeout(10)
def test_state_follows_the_age_of_the_last_heartbeat() -> None:
    table: MembershipTable[str] = MembershipTable()
    assert table.observe(A, "10.0.0.1:7000", now=100.0) is None
    assert table.state(A, 100.0) is PeerState.ALIVE
    assert table.state(A, 101.49) is PeerState.ALIVE
    assert table.state(A, 101.5) is PeerState.SUSPECT
    assert table.state(A, 102.99) is PeerState.SUSPECT
    assert table.state(A, 103.0) is PeerState.DEAD
    assert table.state(A, 1000.0) is PeerState.DEAD
    assert table.state(B, 100.0) is None


@pytest.mark.timeout(10)
def test_dead_peer_rejoins_on_its_next_heartbeat() -> None:
    table: MembershipTable[str] = MembershipTable()
    table.observe(A, "old", now=0.0)
    assert table.state(A, 10.0) is PeerState.DEAD
    assert table.observe(A, "new", now=10.0) is PeerState.DEAD
    assert table.state(A, 10.0) is PeerState.ALIVE
    assert table.info(A) == "new"
    assert table.alive(10.5) == {A}


@pytest.mark.timeout(10)
def test_alive_excludes_suspect_and_dead() -> None:
    table: MembershipTable[float] = MembershipTable()
    table.observe(A, 1.0, now=0.0)
    table.observe(B, 2.0, now=1.0)
    assert table.alive(1.0) == {A, B}
    assert table.alive_info(1.0) == {A: 1.0, B: 2.0}
    assert table.alive(2.0) == {B}  # A is suspect at age 2.0
    assert table.state(A, 2.0) is PeerState.SUSPECT
    assert table.alive(3.0) == set()  # A dead, B suspect
    assert table.alive_info(3.0) == {}


@pytest.mark.timeout(10)
def test_late_heartbeat_does_not_move_last_seen_back() -> None:
    table: MembershipTable[str] = MembershipTable()
    table.observe(A, "x", now=5.0)
    assert table.observe(A, "y", now=4.0) is PeerState.ALIVE  # handled out of order
    assert table.state(A, 6.4) is PeerState.ALIVE  # age measured from 5.0, not 4.0
    assert table.info(A) == "y"


@pytest.mark.timeout(10)
def test_snapshot_reports_states_and_ages_sorted() -> None:
    table: MembershipTable[str] = MembershipTable()
    table.observe(B, "b", now=0.0)
    table.observe(A, "a", now=2.0)
    rows = table.snapshot(now=3.25)
    assert [row.device_id for row in rows] == [A, B]
    assert [row.state for row in rows] == [PeerState.ALIVE, PeerState.DEAD]
    assert [row.last_seen_age for row in rows] == [timedelta(seconds=1.25), timedelta(seconds=3.25)]
    assert [row.info for row in rows] == ["a", "b"]


@pytest.mark.timeout(10)
def test_forget_removes_a_peer_until_it_heartbeats_again() -> None:
    table: MembershipTable[str] = MembershipTable()
    table.observe(A, "a", now=0.0)
    table.observe(B, "b", now=0.0)
    table.forget(A)
    table.forget(A)  # idempotent
    assert A not in table
    assert len(table) == 1
    assert list(table) == [B]
    assert table.state(A, 0.0) is None
    with pytest.raises(KeyError):
        table.info(A)
    assert table.observe(A, "a", now=1.0) is None
    assert table.alive(1.0) == {A, B}


@pytest.mark.timeout(10)
def test_custom_timings_are_used() -> None:
    config = FailureDetectorConfig(
        heartbeat_interval=timedelta(milliseconds=100),
        suspect_after=timedelta(milliseconds=300),
        dead_after=timedelta(milliseconds=600),
    )
    table: MembershipTable[None] = MembershipTable(config)
    table.observe(A, None, now=0.0)
    assert table.config is config
    assert table.state(A, 0.29) is PeerState.ALIVE
    assert table.state(A, 0.3) is PeerState.SUSPECT
    assert table.state(A, 0.6) is PeerState.DEAD
