"""What a message costs this device: a ping-pong over the real tensor transport against an echo.

`profile_transport` times one message hop over the device's own tensor transport (mutual TLS, against
`echo_transport` on another device of the household, or in a second process of this one when none
answers): its fixed cost and its cost per byte — what a throttled or slow CPU adds to every activation,
gradient and all-reduce beyond the network's own time. Both ends import torch and the transport only,
not the model libraries: an echo or a transport-only timing on a board at a fifth of a core starts in
seconds rather than the half-minute that importing transformers takes there (5 s at a whole core of the
project's VM, against 1.5 s without).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from cetd.runtime.timing import SUSTAIN_SECONDS, cpu_seconds, sustained
from cetd.transport.channel import PeerChannel, TensorKey, TensorSpec

__all__ = ["PhaseCost", "TransportProfile", "echo_transport", "hop_cpu_seconds", "near_hop_seconds",
           "profile_transport"]


SENTINEL = -1.0
"""A hop's tensor filled with this ends a phase of `echo_transport` (echoed back, like every message)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseCost:
    """One end's CPU over one phase of the transport profile."""

    messages: int
    """Messages this end sent in the phase (as many as it received)."""
    cpu_seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportProfile:
    """What `profile_transport` measured at its end."""

    hop_seconds: float
    """Wall time of one small message's hop (half a ping-pong)."""
    byte_seconds: float
    """Wall time per byte beyond that."""
    large_bytes: int
    """The large phase's message size."""
    phases: dict[str, PhaseCost]
    """This end's CPU per phase."""


WARM_PHASE = "profile/warm"
"""The first ping-pongs, never counted: they open the stream (TLS handshake, gRPC set-up), which is no
message's cost."""
WARM_PASSES = 5


def _phases(large: int) -> dict[str, torch.Tensor]:
    return {WARM_PHASE: torch.zeros(16, dtype=torch.float32),
            "profile/small": torch.zeros(16, dtype=torch.float32),
            "profile/large": torch.zeros(max(large // 4, 16), dtype=torch.float32)}


def profile_transport(near: PeerChannel, far_rank: int, *, repeats: int = 20, sustain: float = SUSTAIN_SECONDS,
                      large: int = 1 << 20, timeout: float = 60.0) -> TransportProfile:
    """Ping-pong with `echo_transport` at ``far_rank`` on this device: a hop's wall time, and this end's CPU.

    Run the echo in another process of this device (as the daemon's profiler does): a hop between two
    devices costs each of them one process's work on a real socket — a message's framing, TLS, gRPC,
    copies and the wake-ups of the threads that carry it. Two channels inside one process share those
    threads and wake-ups, and timed rings across the testbed's hosts at about twice what such a hop
    predicted (`bench.collectives`). `hop_cpu_seconds` turns both ends' CPU into the device's cost.
    """
    counters = dict.fromkeys(_phases(large), 0)

    def ping_pong(name: str, tensor: torch.Tensor) -> None:
        counters[name] += 1
        spec = TensorSpec(dtype=tensor.dtype, shape=tuple(tensor.shape))
        there, back = (TensorKey(step=counters[name], micro_batch=i, name=name) for i in (0, 1))
        near.send(far_rank, there, tensor).wait(timeout)
        near.recv(far_rank, back, spec, timeout)

    hops, phases = {}, {}
    for name, tensor in _phases(large).items():
        if name == WARM_PHASE:
            for _ in range(WARM_PASSES):
                ping_pong(name, tensor)
            ping_pong(name, torch.full_like(tensor, SENTINEL))
            continue
        passes = repeats if name == "profile/small" else max(2, repeats // 4)
        started = cpu_seconds()
        hops[name] = sustained(functools.partial(ping_pong, name, tensor), passes, sustain) / 2
        ping_pong(name, torch.full_like(tensor, SENTINEL))
        phases[name] = PhaseCost(messages=counters[name], cpu_seconds=cpu_seconds() - started)
    size = _phases(large)["profile/large"].numel() * 4
    small_hop, big_hop = hops["profile/small"], hops["profile/large"]
    return TransportProfile(hop_seconds=small_hop, byte_seconds=max(big_hop - small_hop, 0.0) / size,
                            large_bytes=size, phases=phases)


def echo_transport(far: PeerChannel, near_rank: int, *, large: int = 1 << 20,
                   timeout: float = 60.0) -> dict[str, PhaseCost]:
    """The other end of `profile_transport`: send every message straight back, until each phase's sentinel.

    Returns:
        This end's messages and CPU per phase.
    """
    phases = {}
    for name, tensor in _phases(large).items():
        spec = TensorSpec(dtype=tensor.dtype, shape=tuple(tensor.shape))
        started = cpu_seconds()
        step = 0
        while True:
            step += 1
            message = far.recv(near_rank, TensorKey(step=step, micro_batch=0, name=name), spec, timeout)
            far.send(near_rank, TensorKey(step=step, micro_batch=1, name=name), message).wait(timeout)
            if message.numel() and float(message[0]) == SENTINEL:
                break
        if name != WARM_PHASE:
            phases[name] = PhaseCost(messages=step, cpu_seconds=cpu_seconds() - started)
    return phases


def hop_cpu_seconds(profile: TransportProfile, echo: dict[str, PhaseCost], cpu_share: float) -> tuple[float, float]:
    """Seconds per hop and per byte this device spends on messages, from both ends' CPU.

    A hop's cost is its sender's and its receiver's CPU (each phase: 2 × messages hops, every one
    sent by one end and received by the other), over ``cpu_share``, the CPU-seconds per second this
    device gives a worker (`ShapeTimes.cpu_share`). Unlike a ping-pong's wall time, this does not count
    the wait for a sleeping thread to be scheduled, which swung from run to run by 2× on the testbed's
    shared cores while the rings it stands for took each member's CPU ÷ its share (`bench.collectives`).

    Raises:
        ValueError: the two ends disagree on a phase's messages, or a share that is not positive.
    """
    _check_share(cpu_share)
    per_hop = {}
    for name, near in profile.phases.items():
        far = echo.get(name)
        if far is None or far.messages != near.messages or near.messages < 1:
            raise ValueError(f"the echo answered {far.messages if far else 0} of {near.messages} messages of {name}")
        per_hop[name] = (near.cpu_seconds + far.cpu_seconds) / (2 * near.messages) / cpu_share
    return _split_hop(per_hop, profile.large_bytes)


def near_hop_seconds(profile: TransportProfile, cpu_share: float) -> tuple[float, float]:
    """Seconds per hop and per byte this device spends on messages, from its own end's CPU alone.

    For a profile whose echo ran on another device: each round trip here is one message sent and one
    received, a whole hop's worth of this device's work (`hop_cpu_seconds` averages the two ends when
    both are on this device), over ``cpu_share``. The echo's CPU is its own device's business, as a
    peer's is in a job.

    Raises:
        ValueError: a phase without messages, or a share that is not positive.
    """
    _check_share(cpu_share)
    per_hop = {}
    for name, near in profile.phases.items():
        if near.messages < 1:
            raise ValueError(f"the profile sent no message in {name}")
        per_hop[name] = near.cpu_seconds / near.messages / cpu_share
    return _split_hop(per_hop, profile.large_bytes)


def _check_share(cpu_share: float) -> None:
    if cpu_share <= 0:
        raise ValueError(f"a CPU share of {cpu_share} is no device's")


def _split_hop(per_hop: dict[str, float], large_bytes: int) -> tuple[float, float]:
    """Seconds per hop (the small messages' figure) and per byte (what a large message adds, per byte)."""
    small, big = per_hop["profile/small"], per_hop["profile/large"]
    return small, max(big - small, 0.0) / large_bytes
