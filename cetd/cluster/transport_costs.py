"""What moving tensors costs the devices' CPUs, beside the network's own time.

Every message over the tensor transport costs its sender and its receiver CPU time: framing, TLS,
gRPC, copying. On a fast machine it is a fraction of a millisecond; on a board held to a fifth of a
core it is several, and a tensor-parallel step makes hundreds of hops. Each device measures it with
`cetd.runtime.transport_profile.profile_transport` (a ping-pong against an echo on another device, or between
two of its own processes where no other device echoes): ``message_seconds`` is the CPU of one hop's
both ends done on that device (one message sent and one received), over the CPU share the device gives
a worker (so, the wall time that CPU takes there), ``byte_seconds`` the extra per byte. A hop between
devices A and B costs half of A's and half of B's; the network's time (latency + bytes / bandwidth)
runs alongside, and the slower of the two sets the pace of a chain of hops such as a ring all-reduce.

Torch-free and pure, like the rest of `cetd.cluster`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "BUCKET_BYTES",
    "BYTE_SECONDS",
    "MAX_RING_MIN_BYTES",
    "MESSAGE_SECONDS",
    "Messaging",
    "all_reduce_seconds",
    "direct_all_reduce_seconds",
    "ring_all_reduce_seconds",
    "ring_min_bytes",
    "uses_ring",
]

MESSAGE_SECONDS = 0.25e-3
"""One hop, both ends, when the device did not measure it (measured here on one full core: 0.25 ms)."""
BYTE_SECONDS = 0.9e-9
"""Per byte of a hop, both ends, when not measured (measured here: 0.87 ns, about 1.1 GB/s)."""
BUCKET_BYTES = 4 * 2**20
"""Gradients are all-reduced in buckets of this size (`cetd.runtime.collectives.DEFAULT_BUCKET_BYTES`)."""
MAX_RING_MIN_BYTES = 2**30
"""`ring_min_bytes` never answers more: a tensor this large is exchanged whole by no plan."""


@dataclass(frozen=True, slots=True)
class Messaging:
    """A device's CPU cost of the tensor transport."""

    message_seconds: float = MESSAGE_SECONDS
    """One hop with both ends on this device."""
    byte_seconds: float = BYTE_SECONDS
    """The same hop's extra time per byte."""

    def hops(self, count: float, nbytes: float = 0.0) -> float:
        """CPU seconds this device spends on ``count`` whole hops (sending and receiving) of ``nbytes`` each."""
        return count * (self.message_seconds + nbytes * self.byte_seconds)

    def ends(self, count: float, nbytes: float = 0.0) -> float:
        """CPU seconds for ``count`` messages this device only sends or only receives (half a hop each)."""
        return self.hops(count, nbytes) / 2

    @staticmethod
    def slowest(devices: Iterable[Messaging]) -> Messaging:
        """The costliest per message and per byte among ``devices`` (the pace of a ring)."""
        members = list(devices)
        if not members:
            return Messaging(0.0, 0.0)
        return Messaging(max(m.message_seconds for m in members), max(m.byte_seconds for m in members))


def ring_all_reduce_seconds(size: float, members: int, bandwidth: float, latency: float,
                            cpu: Messaging | None = None, bucket_bytes: float = math.inf) -> float:
    """A ring all-reduce of ``size`` bytes among ``members``: per bucket 2(n−1) steps, each moving a 1/n chunk
    over the link while every member sends one chunk and receives one; the slower of wire and CPU sets each
    step."""
    if members <= 1 or size <= 0:
        return 0.0
    buckets = max(1, math.ceil(size / bucket_bytes))
    chunk = size / buckets / members
    wire = chunk / bandwidth + latency
    work = cpu.hops(1, chunk) if cpu is not None else 0.0
    return buckets * 2 * (members - 1) * max(wire, work)


def direct_all_reduce_seconds(size: float, members: int, bandwidth: float, latency: float,
                              cpu: Messaging | None = None) -> float:
    """An all-reduce of ``size`` bytes among ``members`` by exchanging it whole: in one round every member
    sends its tensor to each of the others and receives theirs (``members − 1`` hops of the whole size,
    both ends), its link carrying ``members − 1`` copies each way; the slower of wire and CPU sets it."""
    if members <= 1 or size <= 0:
        return 0.0
    wire = (members - 1) * size / bandwidth + latency
    work = cpu.hops(members - 1, size) if cpu is not None else 0.0
    return max(wire, work)


def uses_ring(size: float, members: int, threshold: float) -> bool:
    """Whether `cetd.runtime.collectives.all_reduce_` sends ``size`` bytes round a ring: from ``threshold``
    bytes (and a byte per member at least), else it exchanges them whole."""
    return size >= threshold and size >= members


def all_reduce_seconds(size: float, members: int, bandwidth: float, latency: float, cpu: Messaging | None,
                       threshold: float) -> float:
    """The all-reduce `cetd.runtime.collectives.all_reduce_` runs for ``size`` bytes (`uses_ring`)."""
    if uses_ring(size, members, threshold):
        return ring_all_reduce_seconds(size, members, bandwidth, latency, cpu)
    return direct_all_reduce_seconds(size, members, bandwidth, latency, cpu)


def ring_min_bytes(members: int, bandwidth: float, latency: float, cpu: Messaging | None) -> int:
    """The size from which a ring all-reduce is no slower than exchanging the tensor whole, for these
    members, link and message costs (at most `MAX_RING_MIN_BYTES`).

    The ring sends 2(n − 1) messages of 1/n of the tensor each, the whole exchange n − 1 of all of it: the
    ring moves fewer bytes, the exchange pays fewer messages and one latency instead of 2(n − 1). Where a
    message costs a device milliseconds of CPU (the testbed's capped hosts: 1.6 ms for 0.45 of a core) the
    exchange wins up to several hundred kilobytes; on a fast link between fast machines the ring wins from
    tens of kilobytes. Both times grow with the size and their difference changes sign once, so a
    bisection finds the crossing.
    """
    def ring_wins(size: float) -> bool:
        return (ring_all_reduce_seconds(size, members, bandwidth, latency, cpu)
                <= direct_all_reduce_seconds(size, members, bandwidth, latency, cpu))

    if members <= 2 or not ring_wins(MAX_RING_MIN_BYTES):
        # With two members the ring sends two half-size messages where the exchange sends one whole one.
        return MAX_RING_MIN_BYTES
    low, high = 1, MAX_RING_MIN_BYTES
    while low < high:
        middle = (low + high) // 2
        if ring_wins(middle):
            high = middle
        else:
            low = middle + 1
    return max(low, members)
