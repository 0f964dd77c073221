"""What the planner is given and what it predicts; the candidates it is measured against; the load-free estimate.

- `make_offers`: the devices as the planner sees them. ``raw``: the daemon's input — each device's times
  for the job's own shapes (`cetd.runtime.profiling.profile_shape`: block, embedding, head, AdamW step,
  sustained under the device's quota and the machine's other load). ``load_free``: a GPT-2 small block's
  CPU seconds divided by the device's quota, scaled to the job's block by FLOPs
  (`cetd.daemon.planning_inputs.scale_block_seconds`), i.e. a load-free estimate.
- `partitions`: every contiguous split of the blocks over a chain of devices (each stage ≥ 1 block).
- `cpu_model_step`: a measured run's step time without other load: each stage's measured CPU seconds
  per micro-batch (compute and transport threads: the quota caps them together) divided by its quota,
  through the pipeline makespan Σ r + (M − 1) × max r (`cetd.cluster.cost_model.pipeline_seconds`).
- `calibrated`: the cost model's head and embedding constants set, for the duration of a block, so that
  the model's head and embedding loads equal the measured ones — to show what the planner would choose
  with them (a diagnosis; cetd/cluster is not changed).
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cetd.cluster.shape_costs as shape_costs
from bench.planner.rig import DeviceSetup, JobRun
from cetd.cluster.cost_model import DeviceOffer, Link, pipeline_seconds
from cetd.cluster.planner import pipeline_plan
from cetd.daemon.planning_inputs import scale_block_seconds
from cetd.runtime.spec import JobPlan, JobSpec, ModelDescription

__all__ = ["LOOPBACK", "Candidate", "Offers", "calibrated", "chain_of", "cpu_model_step", "make_offers",
           "partitions", "ranges_of"]

LOOPBACK = Link(bandwidth_bytes_per_second=0.5e9, latency_seconds=0.0005, half_duplex=False)
"""The links between the simulated devices: gRPC + mutual TLS on loopback (DESIGN: ≈ 0.5–0.7 GB/s)."""

MEMORY_BYTES = 4 * 1024**3
"""What every device offers (the model needs a fraction of it)."""

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Offers:
    """The planner's view of the devices, by device name, two ways (see the module docstring)."""

    raw: dict[str, DeviceOffer]
    load_free: dict[str, DeviceOffer]


def make_offers(profiles: Mapping[str, Mapping[str, Any]], setups: Sequence[DeviceSetup],
                device_ids: Mapping[str, str], description: ModelDescription, seq_len: int) -> Offers:
    """`DeviceOffer`s from the devices' profiles (see the module docstring)."""
    raw: dict[str, DeviceOffer] = {}
    free: dict[str, DeviceOffer] = {}
    for setup in setups:
        profile = profiles[setup.name]
        shape = profile["shape"]
        raw[setup.name] = DeviceOffer(
            device_id=device_ids[setup.name], memory_bytes=MEMORY_BYTES, cores=1,
            block_seconds=shape["block_seconds"], embedding_blocks=shape["embedding_blocks"],
            head_blocks=shape["head_blocks"], optimizer_seconds_per_parameter=shape["optimizer_seconds_per_parameter"],
            block_fixed_seconds=shape["block_fixed_seconds"] or None)
        free[setup.name] = DeviceOffer(
            device_id=device_ids[setup.name], memory_bytes=MEMORY_BYTES, cores=1,
            block_seconds=scale_block_seconds(float(profile["block_seconds_cpu"] / setup.cpu_fraction), description,
                                              seq_len))
    return Offers(raw=raw, load_free=free)


def partitions(num_blocks: int, stages: int) -> list[Ranges]:
    """Every split of ``num_blocks`` blocks into ``stages`` contiguous non-empty ranges."""
    out = []
    for cuts in itertools.combinations(range(1, num_blocks), stages - 1):
        bounds = (0, *cuts, num_blocks)
        out.append(tuple(itertools.pairwise(bounds)))
    return out


def ranges_of(plan: JobPlan) -> Ranges:
    return tuple((w.start_block, w.end_block) for w in sorted(plan.workers, key=lambda w: w.stage))


def chain_of(plan: JobPlan, names: Mapping[str, str]) -> tuple[str, ...]:
    """The plan's devices in stage order, by name (``names``: device ID → name)."""
    return tuple(names[w.device_id] for w in sorted(plan.workers, key=lambda w: w.stage))


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One partition (a chain of devices and their block ranges) and its plan."""

    chain: tuple[str, ...]
    ranges: Ranges

    @property
    def key(self) -> str:
        return " → ".join(f"{name}[{a}:{b})" for name, (a, b) in zip(self.chain, self.ranges, strict=True))

    @property
    def blocks(self) -> str:
        return "/".join(str(b - a) for a, b in self.ranges)

    def plan(self, spec: JobSpec, offers: Mapping[str, DeviceOffer]) -> JobPlan:
        return pipeline_plan(spec, [offers[name] for name in self.chain], self.ranges)


def cpu_model_step(run: JobRun, fractions: Mapping[str, float], micro_batches: int) -> float:
    """The run's step time without other load (see the module docstring)."""
    ordered = sorted(run.stages, key=lambda s: s.stage)
    per_micro = [s.cpu_seconds_per_step / fractions[s.device] / micro_batches for s in ordered]
    return pipeline_seconds(per_micro, [], micro_batches)


def median_cpu_model(runs: Sequence[JobRun], fractions: Mapping[str, float], micro_batches: int) -> float:
    return statistics.median(cpu_model_step(r, fractions, micro_batches) for r in runs)


def pooled_median_step(runs: Sequence[JobRun]) -> float:
    """The median of every timed step of ``runs`` together."""
    return statistics.median(s for r in runs for s in r.step_seconds[r.warmup :])


@contextlib.contextmanager
def calibrated(*, head_efficiency: float, embedding_blocks: float) -> Iterator[None]:
    """The cost model's `HEAD_EFFICIENCY` and `EMBEDDING_BLOCKS` (`cetd.cluster.shape_costs`, where
    `model_costs` reads them) replaced for the block's duration."""
    saved = shape_costs.HEAD_EFFICIENCY, shape_costs.EMBEDDING_BLOCKS
    shape_costs.HEAD_EFFICIENCY, shape_costs.EMBEDDING_BLOCKS = head_efficiency, embedding_blocks
    try:
        yield
    finally:
        shape_costs.HEAD_EFFICIENCY, shape_costs.EMBEDDING_BLOCKS = saved


def measured_loads(parts: Mapping[str, Any]) -> tuple[float, float]:
    """(head, embedding) forward + backward cost in blocks, from `bench.pipeline.split.StageCosts` fields."""
    block = statistics.mean(parts["blocks"])
    return float(parts["head"]) / block, float(parts["embedding"]) / block


def head_efficiency_for(spec: JobSpec, description: ModelDescription, head_blocks: float) -> float:
    """The `HEAD_EFFICIENCY` under which the cost model's head load is ``head_blocks``."""
    with calibrated(head_efficiency=1.0, embedding_blocks=shape_costs.EMBEDDING_BLOCKS):
        per_unit = shape_costs.model_costs(spec, description).head_blocks
    return head_blocks / per_unit
