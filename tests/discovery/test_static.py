"""Static peer list: host:port parsing, IPv6 brackets, duplicates, and clear errors."""

from __future__ import annotations

import pytest

from cetd.discovery.static import parse_static_peers
from cetd.errors import ConfigError


@pytest.mark.timeout(10)
def test_parses_hosts_ipv4_and_bracketed_ipv6_in_order() -> None:
    entries = ["pi.local:7443", " 10.77.0.2:7000 ", "[fe80::1]:7443", "127.0.0.1:1", "127.0.0.1:65535"]
    assert parse_static_peers(entries) == [
        ("pi.local", 7443),
        ("10.77.0.2", 7000),
        ("fe80::1", 7443),
        ("127.0.0.1", 1),
        ("127.0.0.1", 65535),
    ]


@pytest.mark.timeout(10)
def test_duplicates_are_dropped() -> None:
    assert parse_static_peers(["a:1", "b:2", "a:1"]) == [("a", 1), ("b", 2)]
    assert parse_static_peers([]) == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("pi.local", "has no port"),
        (":7443", "no valid host"),
        ("pi.local:", "port ''"),
        ("pi.local:http", "port 'http'"),
        ("pi.local:0", "port '0'"),
        ("pi.local:65536", "port '65536'"),
        ("pi.local:-1", "port '-1'"),
        ("fe80::1:7443", "IPv6 address in brackets"),
        ("[fe80::1]7443", "ipv6-address"),
        ("[fe80::1", "ipv6-address"),
        ("my host:1", "no valid host"),
    ],
)
def test_bad_entries_raise_config_error_naming_the_entry(entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_static_peers(["ok:1", entry])
    assert repr(entry) in str(caught.value)
