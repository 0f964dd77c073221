"""Network paths between devices, as the cost model and the planner see them.

Torch-free and pure, like the rest of `cetd.cluster`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cetd.cluster.device_offer import DeviceOffer

__all__ = ["DEFAULT_LINK", "Link", "LinkMap", "link_between", "slowest_link"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """A network path between two devices."""

    bandwidth_bytes_per_second: float
    latency_seconds: float = 0.0
    half_duplex: bool = True
    """Wi-Fi: sending and receiving share the air, so a link carries one direction at a time."""


DEFAULT_LINK = Link(bandwidth_bytes_per_second=0.12e9, latency_seconds=0.002)
"""1000 Mbps Wi-Fi (≈ 0.12 GB/s, the paper's testbed), a couple of milliseconds per message."""

LinkMap = Mapping[tuple[str, str], Link]


def link_between(links: LinkMap | None, a: str, b: str) -> Link:
    """The link from ``a`` to ``b`` (either order in ``links``), else `DEFAULT_LINK`."""
    if links:
        found = links.get((a, b)) or links.get((b, a))
        if found is not None:
            return found
    return DEFAULT_LINK


def slowest_link(links: LinkMap | None, members: Sequence[DeviceOffer]) -> Link:
    """The narrowest link between any two of ``members`` (`DEFAULT_LINK` for fewer than two)."""
    ids = [m.device_id for m in members]
    return min((link_between(links, a, b) for a in ids for b in ids if a < b),
               key=lambda link: link.bandwidth_bytes_per_second, default=DEFAULT_LINK)
