"""A fixed list of peers to dial, for networks without multicast (headless setups, CI, VPNs).

Entries are ``host:port`` (``[v6addr]:port`` for IPv6). Only addresses are known up front: the
daemon dials each one and learns the device ID from the peer's TLS certificate.
"""

from __future__ import annotations

from collections.abc import Iterable

from cetd.errors import ConfigError

__all__ = ["parse_static_peers"]


def parse_static_peers(entries: Iterable[str]) -> list[tuple[str, int]]:
    """Parse ``host:port`` entries into (host, port) pairs, in order, without duplicates.

    Raises:
        ConfigError: an entry has no host, no port, or a port outside 1..65535.
    """
    peers: list[tuple[str, int]] = []
    for entry in entries:
        peer = _parse_one(entry)
        if peer not in peers:
            peers.append(peer)
    return peers


def _parse_one(entry: str) -> tuple[str, int]:
    text = entry.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ConfigError(f"static peer {entry!r} is not of the form [ipv6-address]:port")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ConfigError(f"static peer {entry!r} has no port: write it as host:port")
        if ":" in host:
            raise ConfigError(f"static peer {entry!r}: put an IPv6 address in brackets, as [address]:port")
    if not host or any(char.isspace() for char in host):
        raise ConfigError(f"static peer {entry!r} has no valid host: write it as host:port")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"static peer {entry!r} has port {port_text!r}, not a number in 1..65535")
    return host, int(port_text)
