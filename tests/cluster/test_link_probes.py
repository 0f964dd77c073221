"""A link's estimate: the best of its recent probes (a probe can be slowed, never sped up)."""

from __future__ import annotations

import math

import pytest

from cetd.cluster.link_probes import LinkProbes, LinkReading, pair_links


def test_a_late_probe_does_not_lower_the_estimate_while_a_faster_one_is_recent() -> None:
    probes = LinkProbes(keep=3)
    probes.add("a", 100e6, 0.2e-3)
    probes.add("a", 30e6, 2.5e-3)  # the peer's daemon answered late: a busy CPU, not the network
    assert probes["a"] == (100e6, 0.2e-3)
    assert dict(probes) == {"a": (100e6, 0.2e-3)}


def test_a_link_that_really_got_slower_shows_once_the_faster_probes_age_out() -> None:
    probes = LinkProbes(keep=3)
    probes.add("a", 100e6, 0.2e-3)
    for _ in range(3):
        probes.add("a", 20e6, 4e-3)
    assert probes["a"] == (20e6, 4e-3)


def test_bandwidth_and_latency_are_each_the_best_of_the_window() -> None:
    probes = LinkProbes(keep=4)
    probes.add("a", 80e6, 1e-3)
    probes.add("a", 60e6, 0.3e-3)
    probes.add("b", 10e6, 5e-3)
    assert probes["a"] == (80e6, 0.3e-3)
    assert probes["b"] == (10e6, 5e-3)
    assert sorted(probes) == ["a", "b"]
    assert len(probes) == 2


def test_meaningless_probes_are_ignored_and_an_unprobed_peer_is_absent() -> None:
    probes = LinkProbes()
    for bandwidth, latency in ((0.0, 1e-3), (-5.0, 1e-3), (math.inf, 1e-3), (math.nan, 1e-3), (1e6, -1.0),
                               (1e6, math.nan)):
        probes.add("a", bandwidth, latency)
    assert "a" not in probes
    assert probes.get("a", (0.0, 0.0)) == (0.0, 0.0)
    with pytest.raises(KeyError):
        probes["a"]
    probes.add("a", 1e6, 1e-3)
    probes.forget("a")
    assert "a" not in probes


def test_at_least_one_probe_is_kept() -> None:
    with pytest.raises(ValueError, match="at least one"):
        LinkProbes(keep=0)


# The household's links: every daemon probes its own and reports them in its heartbeats.

MB = 1e6


def test_a_pair_that_one_end_measured_is_planned_on_that_measurement_not_the_star() -> None:
    own = {"b": (100 * MB, 1e-3), "c": (100 * MB, 1e-3)}
    reported = {"b": {"a": (90 * MB, 1e-3), "c": (12 * MB, 4e-3)}}  # b and c share a slow link
    links = pair_links("a", own, reported)
    assert links[("b", "c")] == LinkReading(bandwidth_bytes_per_second=12 * MB, latency_seconds=4e-3, measured_by=("b",))
    # Both ends measured a–b: the slower reading, and both named.
    assert links[("a", "b")] == LinkReading(bandwidth_bytes_per_second=90 * MB, latency_seconds=1e-3,
                                            measured_by=("a", "b"))
    assert links[("a", "c")].measured_by == ("a",)


def test_a_pair_nobody_measured_is_inferred_from_both_ends_paths_to_this_device() -> None:
    links = pair_links("a", {"b": (100 * MB, 1e-3), "c": (40 * MB, 3e-3)}, {})
    assert links[("b", "c")] == LinkReading(bandwidth_bytes_per_second=40 * MB, latency_seconds=3e-3, measured_by=())
    assert set(links) == {("a", "b"), ("a", "c"), ("b", "c")}


def test_a_pair_only_others_know_needs_no_link_to_this_device() -> None:
    links = pair_links("a", {}, {"b": {"c": (50 * MB, 2e-3), "b": (1e12, 0.0), "d": (0.0, 1e-3)}})
    assert set(links) == {("b", "c")}  # its own "link" and an unmeasured one are not links
    assert links[("b", "c")].measured_by == ("b",)
