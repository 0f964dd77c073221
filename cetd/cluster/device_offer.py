"""A live member as the planner sees it, and how fast it is: measured by the device, else estimated.

Each device times the job's own shapes (`cetd.runtime.profiling`, asked by the coordinator through
`cetd.daemon.shape_profiles`): a block, the embedding and head, an AdamW step, a hop over the tensor
transport. What a device did not measure is estimated from its cores (or accelerator) with the
constants below, calibrated on this project's 2-core development machines.
"""

from __future__ import annotations

from dataclasses import dataclass

from cetd.cluster.transport_costs import Messaging
from cetd.runtime.spec import JobSpec, ModelDescription

__all__ = [
    "ACCELERATOR_FLOPS",
    "CORE_FLOPS",
    "DeviceOffer",
    "block_seconds_per_sample",
    "estimated_block_seconds",
    "messaging",
    "optimizer_seconds_per_parameter",
    "speed_source",
]

CORE_FLOPS = 40e9
"""Effective float32 FLOP/s of one CPU core in torch's training kernels. Calibrated on the DESIGN anchor:
a GPT-2 small block, micro-batch 8 × 32 tokens (≈ 11 GFLOP forward+backward), takes ≈ 80–150 ms on
2 cores here."""

ACCELERATOR_FLOPS = 200e9
"""Effective float32 FLOP/s of an edge GPU (a Jetson Nano's is ≈ 236 GFLOP/s peak)."""

OPTIMIZER_SECONDS_PER_PARAMETER = 4e-9
"""One AdamW step per parameter on a CPU when not measured (measured here on one thread: 1.6–5.3 ns)."""

ACCELERATOR_OPTIMIZER_SECONDS_PER_PARAMETER = 0.5e-9
"""The same on an edge GPU (memory bound)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceOffer:
    """A live member as the planner sees it."""

    device_id: str
    memory_bytes: int
    cores: int
    rank: float = 0.0
    block_seconds: float | None = None
    """Seconds one block of the job's model takes forward+backward per sample (the profiler's time for a
    micro-batch divided by its samples); None: estimated from ``cores``."""
    power_profile: str = ""
    """Name of its power profile (`cetd.cluster.power.BUILTIN_PROFILES`); "" = `DEFAULT_PROFILE`."""
    accelerator: bool = False
    """It trains on an accelerator (GPU) rather than its CPU cores."""
    embedding_blocks: float | None = None
    """The embedding's forward+backward in blocks, as this device measured it for the job; None: estimated."""
    head_blocks: float | None = None
    """The head's and its loss's forward+backward in blocks, as measured; None: estimated."""
    optimizer_seconds_per_parameter: float | None = None
    """One AdamW step per parameter, as measured; None: estimated."""
    block_fixed_seconds: float | None = None
    """Per micro-batch, the part of a block's time that a tensor-parallel split does not shrink; None: 0."""
    message_seconds: float | None = None
    """One hop over the tensor transport, both ends' work done on this device, over its CPU share, as measured;
    None: estimated."""
    byte_seconds: float | None = None
    """The same hop's extra time per byte, as measured; None: estimated."""


def optimizer_seconds_per_parameter(offer: DeviceOffer) -> float:
    """The measured AdamW seconds per parameter, else the estimate for its kind of device."""
    if offer.optimizer_seconds_per_parameter is not None:
        return offer.optimizer_seconds_per_parameter
    return ACCELERATOR_OPTIMIZER_SECONDS_PER_PARAMETER if offer.accelerator else OPTIMIZER_SECONDS_PER_PARAMETER


def estimated_block_seconds(spec: JobSpec, description: ModelDescription, offer: DeviceOffer) -> float:
    """Seconds per block forward+backward per sample, from FLOPs and the device's cores (no measurement)."""
    seq, hidden = spec.seq_len, description.hidden_size
    forward_per_token = 2 * description.block_parameter_count + 4 * seq * hidden
    flops = 3 * seq * forward_per_token
    rate = ACCELERATOR_FLOPS if offer.accelerator else max(offer.cores, 1) * CORE_FLOPS
    if spec.precision == "float64":
        rate /= 2
    return flops / rate


def speed_source(offer: DeviceOffer) -> str:
    """``measured``: the device timed the job's own shapes; ``profiled``: its reference block, scaled by
    FLOPs; ``estimated``: from its cores (or accelerator) alone."""
    if offer.block_seconds is None or offer.block_seconds <= 0:
        return "estimated"
    return "measured" if offer.optimizer_seconds_per_parameter is not None else "profiled"


def block_seconds_per_sample(spec: JobSpec, description: ModelDescription, offer: DeviceOffer) -> float:
    """The measured block seconds when the offer carries them, else the estimate."""
    if offer.block_seconds is not None and offer.block_seconds > 0:
        return offer.block_seconds
    return estimated_block_seconds(spec, description, offer)


def messaging(offer: DeviceOffer) -> Messaging:
    """The device's measured CPU cost of the tensor transport, else the defaults (`transport_costs`)."""
    default = Messaging()
    return Messaging(default.message_seconds if offer.message_seconds is None else offer.message_seconds,
                     default.byte_seconds if offer.byte_seconds is None else offer.byte_seconds)
