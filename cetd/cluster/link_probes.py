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

Torch-free and pure, like the rest of `cetd.cluster`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping

__all__ = ["KEEP", "LinkProbes"]

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
