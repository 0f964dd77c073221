"""Which device a transport profile's echo is asked of first (`cetd.daemon.shape_profiles.echo_order`)."""

from __future__ import annotations

from cetd.daemon.shape_profiles import echo_order
from cetd.transport.peer_info import Capabilities


def _device(machine: str, block_seconds: float) -> Capabilities:
    return Capabilities(cores=2, memory_bytes=2**30, machine=machine, block_seconds=block_seconds)


def test_another_machine_comes_first_then_the_fastest_device_then_the_unprofiled() -> None:
    capabilities = {
        "me": _device("m1", 0.004),
        "twin-fast": _device("m1", 0.001),  # shares my machine: last however fast
        "slow": _device("m2", 0.009),
        "fast": _device("m3", 0.002),
        "unprofiled": _device("m4", 0.0),
        "aa-fast": _device("m5", 0.002),  # the same speed as "fast": by device ID
    }
    order = echo_order("me", capabilities, ["slow", "twin-fast", "me", "unprofiled", "fast", "aa-fast", "unknown"])
    assert order == ["aa-fast", "fast", "slow", "unknown", "unprofiled", "twin-fast"]  # unknown: no capabilities seen


def test_without_machines_every_device_is_another_machine() -> None:
    capabilities = {"me": _device("", 0.004), "a": _device("", 0.003), "b": _device("", 0.001)}
    assert echo_order("me", capabilities, {"a", "b"}) == ["b", "a"]
    assert echo_order("me", {}, {"b", "a", "me"}) == ["a", "b"]
