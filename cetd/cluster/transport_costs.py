"""What moving tensors costs the devices' CPUs, beside the network's own time.

Every message over the tensor transport costs its sender and its receiver CPU time: framing, TLS,
gRPC, copying. On a fast machine it is a fraction of a millisecond; on a board held to a fifth of a
core it is several, and a tensor-parallel step makes hundreds of hops. Each device measures it with
`cetd.runtime.profiling.profile_transport` (a ping-pong between two of its processes):
``message_seconds`` is one hop's CPU with both ends on that device, over the CPU share the device gives
a worker (so, the wall time that CPU takes there), ``byte_seconds`` the extra per byte. A hop between
devices A and B costs half of A's and half of B's; the network's time (latency + bytes / bandwidth)
runs alongside, and the slower of the two sets the pace of a chain of hops such as a ring all-reduce.

Torch-free and pure, like the rest of `cetd.cluster`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["BUCKET_BYTES", "BYTE_SECONDS", "MESSAGE_SECONDS", "Messaging", "ring_all_reduce_seconds"]

MESSAGE_SECONDS = 0.25e-3
"""One hop, both ends, when the device did not measure it (measured here on one full core: 0.25 ms)."""
BYTE_SECONDS = 0.9e-9
"""Per byte of a hop, both ends, when not measured (measured here: 0.87 ns, about 1.1 GB/s)."""
BUCKET_BYTES = 4 * 2**20
"""Gradients are all-reduced in buckets of this size (`cetd.runtime.collectives.DEFAULT_BUCKET_BYTES`)."""


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
