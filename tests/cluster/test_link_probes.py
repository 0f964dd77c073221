"""A link's estimate: the best of its recent probes (a probe can be slowed, never sped up)."""

from __future__ import annotations

import math

import pytest

from cetd.cluster.link_probes import LinkProbes


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
