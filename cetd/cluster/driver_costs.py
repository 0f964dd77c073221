"""The driver's part of every step, and each worker's intake of its micro-batches.

Torch-free and pure, like the rest of `cetd.cluster`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cetd.cluster.device_offer import DeviceOffer, messaging
from cetd.cluster.links import LinkMap, link_between, slowest_link
from cetd.cluster.transport_costs import Messaging
from cetd.runtime.spec import JobPlan, JobSpec, WorkerAssignment

__all__ = ["CONTROL_BYTES", "DRIVER", "DriverCosts", "Intake", "batch_fields", "field_bytes", "intakes",
           "micro_samples", "split_evenly"]

DRIVER = "driver"
"""The driver's resource in the step graph when it runs on no device of the plan (a device left out, or
one the forecast was not told); on a device of the plan it shares that device's CPU with its worker."""
CONTROL_BYTES = 8.0
"""A control value or a loss: one 8-byte number."""


def micro_samples(spec: JobSpec) -> int:
    """Samples per micro-batch."""
    return max(1, spec.global_batch // spec.micro_batches)


def split_evenly(count: int, parts: int) -> list[int]:
    """``count`` into ``parts`` shares differing by at most one, the larger first (replicas' micro-batches)."""
    base, extra = divmod(count, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class DriverCosts:
    """The driver's part of every step (`cetd.runtime.driver`). Once a step's loss reaches it (one message
    to receive), it announces the next step to every worker and sends each the fields of its micro-batches
    that its share reads, a message per control and per field: for four data-parallel workers, 17 messages
    a step. It runs on the device the job was submitted to, a Python process beside that device's worker
    where the plan uses it: on the testbed that device's CPU showed 16 ms more per 0.154 s step (at 0.45 of
    a core) than its peers', where one hop costs 1.9 ms; two small hops would be 4 ms.

    When the forecast is not told the device (or it is not offered), the driver is priced as the plan's
    device whose messages cost least, on a CPU of its own, and its links as the plan's slowest.
    """

    def __init__(self, spec: JobSpec, plan: JobPlan, links: LinkMap | None, offers: Mapping[str, DeviceOffer],
                 driver: str | None) -> None:
        members = [offers[w.device_id] for w in plan.workers]
        self.device = driver if driver is not None and driver in offers else None
        if self.device is not None:
            cpu = messaging(offers[self.device])
        else:
            cpu = min((messaging(m) for m in members), key=lambda m: m.hops(1, CONTROL_BYTES), default=Messaging())
        self.resource = self.device if self.device in {w.device_id for w in plan.workers} else DRIVER
        self.links, self.slowest = links, slowest_link(links, members)
        fields = sum(intake.micro_batches * intake.fields for intake in intakes(spec, plan).values())
        self.seconds = cpu.ends(1 + len(plan.workers), CONTROL_BYTES) + cpu.ends(fields, field_bytes(spec))
        self.messages = 1 + len(plan.workers) + fields
        self.bytes_sent = len(plan.workers) * CONTROL_BYTES + fields * field_bytes(spec)
        """Each step: every worker's control and its micro-batches' fields."""
        self.bytes_received = CONTROL_BYTES
        """Each step: the loss."""

    def latency(self, device_id: str, nbytes: float = CONTROL_BYTES) -> float:
        """A message of ``nbytes`` between the driver and ``device_id``: nothing on one device."""
        if device_id == self.device:
            return 0.0
        link = link_between(self.links, self.device, device_id) if self.device is not None else self.slowest
        return link.latency_seconds + nbytes / link.bandwidth_bytes_per_second

    def charge(self, busy: dict[str, float]) -> None:
        """Add the driver's seconds to its device's ``busy`` seconds, where the plan uses that device."""
        if self.resource != DRIVER:
            busy[self.resource] += self.seconds

    def note(self) -> str:
        where = f"on {self.device}" if self.device is not None else "on the submitting device"
        return f"driver {where}: {self.messages} messages, {self.seconds:.3f} s per step"


@dataclass(frozen=True, slots=True)
class Intake:
    """What one worker takes in from the driver each step: the step's control, and the fields its share reads
    of its micro-batches, a message each."""

    worker: WorkerAssignment
    micro_batches: int
    """Its replica's share of the step's micro-batches."""
    first: bool
    """Its chain's first stage (a tensor-parallel worker is first and last: it runs the whole model's ends)."""
    last: bool

    @property
    def fields(self) -> int:
        """Fields it reads of each micro-batch (`batch_fields`)."""
        return batch_fields(self.worker, first=self.first, last=self.last)

    def nbytes(self, spec: JobSpec) -> float:
        """The bytes of its micro-batches' fields."""
        return self.micro_batches * self.fields * field_bytes(spec)

    def seconds(self, spec: JobSpec, offer: DeviceOffer) -> float:
        """Its device's CPU for taking in the control and the fields."""
        cpu = messaging(offer)
        return cpu.ends(self.fields * self.micro_batches, field_bytes(spec)) + cpu.ends(1, CONTROL_BYTES)


def intakes(spec: JobSpec, plan: JobPlan) -> dict[int, Intake]:
    """Every worker's `Intake`, by rank: replicas (by data-parallel index) share the micro-batches evenly."""
    if plan.parallelism == "tensor":
        return {w.rank: Intake(w, spec.micro_batches, True, True) for w in plan.workers}
    replicas = sorted({w.dp_index for w in plan.workers})
    shares = dict(zip(replicas, split_evenly(spec.micro_batches, len(replicas)), strict=True))
    stages = {r: [w.stage for w in plan.workers if w.dp_index == r] for r in replicas}
    return {w.rank: Intake(w, shares[w.dp_index], w.stage == min(stages[w.dp_index]),
                           w.stage == max(stages[w.dp_index]))
            for w in plan.workers}


def batch_fields(worker: WorkerAssignment, *, first: bool, last: bool) -> int:
    """Fields a worker's share reads (`cetd.runtime.models`): input IDs on the first stage, the attention
    mask where it runs blocks, the labels on the last."""
    return int(first) + int(worker.end_block > worker.start_block) + int(last)


def field_bytes(spec: JobSpec) -> float:
    """One micro-batch field: int64 per token."""
    return micro_samples(spec) * spec.seq_len * 8
