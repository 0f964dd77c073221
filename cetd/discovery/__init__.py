"""Discovery: where might the other daemons of this network be?

mDNS/DNS-SD adverts (`MdnsNode`, `MdnsAnnouncer`, `MdnsBrowser`) for LANs, a static peer list for
networks without multicast. Discovery only yields addresses to dial; trust comes from mutual TLS
and liveness from heartbeats, both elsewhere. This package never imports the transport or torch.
"""

from __future__ import annotations

from cetd.discovery.advert import SERVICE_TYPE, Advert, AdvertState, CapabilitySummary
from cetd.discovery.mdns import MdnsAnnouncer, MdnsBrowser, MdnsNode, Sighting
from cetd.discovery.static import parse_static_peers

__all__ = [
    "SERVICE_TYPE",
    "Advert",
    "AdvertState",
    "CapabilitySummary",
    "MdnsAnnouncer",
    "MdnsBrowser",
    "MdnsNode",
    "Sighting",
    "parse_static_peers",
]
