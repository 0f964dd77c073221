"""What the coordinator hands the planner, read off the household: offers, power profiles, links.

Also the address book a job's processes connect with. Kept apart from `jobs` (the RPC side) so that
the numbers the planner sees are defined in one place.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from cetd.cluster.cost_model import Link
from cetd.cluster.planner import DeviceOffer
from cetd.cluster.power import EnergyModel, PowerProfile, profile_for
from cetd.identity import tls_server_name
from cetd.ids import DeviceId
from cetd.runtime.spec import ModelDescription, ShapeTimes
from cetd.transport.job_types import WorkerEndpoint
from cetd.transport.peer_info import Capabilities

from .household import HouseholdNode

REFERENCE_BLOCK = (768, 12, 32)
"""The profiler's block: GPT-2 small's hidden size, heads and a 32-token sequence."""

DEFAULT_PROFILE = "laptop"
"""Power profile of a device that advertises none."""


def scale_block_seconds(measured: float, description: ModelDescription | None, seq_len: int) -> float | None:
    """The profiled per-sample block time, scaled to the model's block by its forward FLOPs per sample.

    A block costs about 24·h² + 4·h·T multiply-adds per token (projections, MLP, attention scores).
    """
    if measured <= 0 or description is None:
        return None
    hidden, _, tokens = REFERENCE_BLOCK

    def flops(h: int, t: int) -> float:
        return t * (24.0 * h * h + 4.0 * h * t)

    return measured * flops(description.hidden_size, seq_len) / flops(hidden, tokens)


def power_profile(name: str) -> PowerProfile:
    return profile_for(name or DEFAULT_PROFILE)


def offered_memory(capabilities: Capabilities) -> int:
    """The memory a plan may use on a device: what it has free now where it measured that, never more than
    its ceiling (physical memory, its cgroup's limit, its configured limit)."""
    if capabilities.free_memory_bytes > 0:
        return min(capabilities.memory_bytes, capabilities.free_memory_bytes)
    return capabilities.memory_bytes


def member_offers(node: HouseholdNode, description: ModelDescription | None = None, seq_len: int = 32,
                  shapes: Mapping[str, ShapeTimes] | None = None) -> list[DeviceOffer]:
    """The live members as the planner sees them: with the times each measured for the job's own shapes
    (``shapes``, by device ID), else their reference block's time scaled to the model, and the memory each
    has free now (never more than its ceiling)."""
    infos = [node.self_info, *node.table.alive_info(time.monotonic()).values()]
    offers = []
    for info in infos:
        if not node.roster.roster.is_member(info.device_id):
            continue
        capabilities = info.capabilities
        offer = DeviceOffer(device_id=info.device_id, memory_bytes=offered_memory(capabilities), cores=capabilities.cores,
                            rank=capabilities.rank, power_profile=capabilities.power_profile,
                            accelerator=bool(capabilities.accelerator),
                            block_seconds=scale_block_seconds(capabilities.block_seconds, description, seq_len))
        measured = (shapes or {}).get(info.device_id)
        if measured is not None:
            offer = replace(offer, block_seconds=measured.block_seconds, embedding_blocks=measured.embedding_blocks,
                            head_blocks=measured.head_blocks,
                            optimizer_seconds_per_parameter=measured.optimizer_seconds_per_parameter,
                            block_fixed_seconds=measured.block_fixed_seconds or None,
                            message_seconds=measured.message_seconds or None, byte_seconds=measured.byte_seconds or None)
        offers.append(offer)
    return offers


def planning_inputs(node: HouseholdNode, offers: list[DeviceOffer]) -> tuple[dict[str, PowerProfile], dict[Any, Link]]:
    """Power profiles of the offered devices and every pair's link, measured by either end where one did
    (`HouseholdNode.pair_links`)."""
    profiles = {o.device_id: power_profile(o.power_profile) for o in offers}
    links: dict[Any, Link] = {pair: Link(bandwidth_bytes_per_second=link.bandwidth_bytes_per_second,
                                         latency_seconds=link.latency_seconds)
                              for pair, link in node.pair_links().items()}
    return profiles, links


def energy_model(node: HouseholdNode, devices: set[str]) -> EnergyModel:
    """Power profiles of ``devices`` as they advertise them."""
    advertised = {str(k): v.capabilities.power_profile for k, v in node.table.alive_info(time.monotonic()).items()}
    advertised[node.identity.device_id] = node.self_info.capabilities.power_profile
    return EnergyModel(profiles={d: power_profile(advertised.get(d, "")) for d in devices},
                       default=power_profile(""))


def peer_map(endpoints: tuple[WorkerEndpoint, ...]) -> dict[str, list[str]]:
    """Rank → [address, TLS server name] for a job process's `connect` (it skips its own rank)."""
    return {str(e.rank): [e.address, tls_server_name(DeviceId(e.device_id))] for e in endpoints}
