"""The links the coordinator plans with: every measured pair, the better of two readings, a star for the rest."""

from __future__ import annotations

from cetd.cluster.cost_model import Link, link_between
from cetd.daemon.planning_inputs import link_map
from cetd.transport.job_types import MeasuredLink


def _link(peer: str, megabytes: float, milliseconds: float) -> MeasuredLink:
    return MeasuredLink(peer_id=peer, bandwidth_bytes_per_second=megabytes * 1e6, latency_seconds=milliseconds / 1e3)


def test_pairs_measured_by_other_members_are_used_and_the_rest_go_through_the_coordinator() -> None:
    links = link_map("me", {
        "me": [_link("a", 100, 1.0), _link("b", 50, 2.0), _link("c", 80, 0.5)],
        "a": [_link("me", 90, 1.5), _link("b", 110, 0.3)],  # a measured its own path to b
        "b": [_link("a", 100, 0.4), _link("never", 0, 0)],  # a failed probe (no bandwidth) is no measurement
    })
    # me–a measured from both ends: the better reading of each quantity.
    assert link_between(links, "a", "me") == Link(bandwidth_bytes_per_second=100e6, latency_seconds=1.0e-3)
    # a–b measured by both of them, not inferred through me (which would say 50 MB/s, 2 ms).
    assert link_between(links, "b", "a") == Link(bandwidth_bytes_per_second=110e6, latency_seconds=0.3e-3)
    # Nobody measured a–c or b–c: the slower of their measured paths to me.
    assert link_between(links, "a", "c") == Link(bandwidth_bytes_per_second=80e6, latency_seconds=1.0e-3)
    assert link_between(links, "c", "b") == Link(bandwidth_bytes_per_second=50e6, latency_seconds=2.0e-3)
    assert all("never" not in pair for pair in links)
    assert all(a < b for a, b in links)


def test_without_any_measurement_there_are_no_links() -> None:
    assert link_map("me", {"me": [], "a": [_link("a", 100, 1.0)]}) == {}  # a link to itself is ignored
