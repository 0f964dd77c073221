"""A link's estimate from its recent probes: the best of them, since a probe can only be slowed.

A daemon probes one peer at a time over the real transport (`cetd.daemon.household`). A probe's round
trip is the network's time plus both daemons' time to handle it, and a daemon held to a share of a core,
or busy (a profile, a job starting), handles some late, and the plan of the moment took whichever
probe came last (on the study's testbed, one data-parallel forecast put a gradient all-reduce at 0.214 s
where the step left about 0.12 s for it, more than the devices' transport CPU explains; the probe values
were not logged). Nothing makes a probe faster than the link, so the estimate is the
highest bandwidth and the lowest latency among the last `KEEP` probes of that peer: a slow probe is
forgotten after `KEEP` more, and a link that really got slower shows so once its older, faster probes
have aged out.

Every daemon probes its own links and reports them in its heartbeats; `pair_links` puts the household's
reports together into one reading per pair of devices.

Torch-free and pure, like the rest of `cetd.cluster`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

__all__ = ["KEEP", "LinkProbes", "LinkReading", "pair_links"]

KEEP = 4
"""Probes kept per peer (a daemon probes each of N peers every N × 5 s: a minute's worth for three peers)."""


class LinkProbes(Mapping[str, tuple[float, float]]):
    """Peer → (bandwidth bytes/s, latency s): the best of its last `KEEP` probes; read like a dict."""

    def __init__(self, keep: int = KEEP) -> None:
        if keep < 1:
            raise ValueError(f"keep at least one probe, not {keep}")
        self._keep = keep
        self._probes: dict[str, deque[tuple[float, float]]] = {}

    def add(self, peer: str, bandwidth: float, latency: float) -> None:
        """One probe's result; a non-positive or non-finite bandwidth or a negative latency is ignored."""
        if not (0 < bandwidth < float("inf")) or not (0 <= latency < float("inf")):
            return
        self._probes.setdefault(peer, deque(maxlen=self._keep)).append((bandwidth, latency))

    def forget(self, peer: str) -> None:
        self._probes.pop(peer, None)

    def __getitem__(self, peer: str) -> tuple[float, float]:
        probes = self._probes[peer]
        return max(b for b, _ in probes), min(latency for _, latency in probes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._probes)

    def __len__(self) -> int:
        return len(self._probes)


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkReading:
    """What the household knows of one pair's link (`pair_links`)."""

    bandwidth_bytes_per_second: float
    latency_seconds: float
    measured_by: tuple[str, ...]
    """The ends whose probes measured it; () where it is inferred."""


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def pair_links(me: str, own: Mapping[str, tuple[float, float]],
               reported: Mapping[str, Mapping[str, tuple[float, float]]]) -> dict[tuple[str, str], LinkReading]:
    """Every pair's link, keyed ``(a, b)`` with ``a < b``, from this device's probes (``own``: peer →
    (bandwidth bytes/s, latency s)) and its peers' (``reported``: peer → its own table, from its heartbeats).

    A pair that both ends measured takes the slower reading (the lower bandwidth, the higher latency): a
    probe can only be slowed, but a plan that counts on the faster reading misses when the link is the
    slower one. A pair between two of this device's peers that neither measured is inferred as a home
    network's star around the access point: the slower of their two paths to this device.
    """
    readings: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    for source, table in [(me, own), *reported.items()]:
        for peer, (bandwidth, latency) in table.items():
            if peer != source and bandwidth > 0:
                readings.setdefault(_pair(source, peer), []).append((source, bandwidth, latency))
    links = {pair: LinkReading(bandwidth_bytes_per_second=min(b for _, b, _ in found),
                               latency_seconds=max(t for _, _, t in found),
                               measured_by=tuple(sorted({s for s, _, _ in found})))
             for pair, found in readings.items()}
    mine = {peer: links[_pair(me, peer)] for peer, (bandwidth, _) in own.items() if peer != me and bandwidth > 0}
    for a, b in itertools.combinations(sorted(mine), 2):
        if (a, b) not in links:
            links[(a, b)] = LinkReading(
                measured_by=(),
                bandwidth_bytes_per_second=min(mine[a].bandwidth_bytes_per_second, mine[b].bandwidth_bytes_per_second),
                latency_seconds=max(mine[a].latency_seconds, mine[b].latency_seconds))
    return links
