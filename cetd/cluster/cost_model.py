"""Predicted step time, memory and energy of a plan: what the planner compares candidate plans by.

Inputs per device: seconds per transformer block forward+backward per sample, the embedding's and the
head's cost in blocks, one AdamW step's seconds per parameter and a message's CPU cost (each device times
the job's own shapes, `cetd.runtime.profiling`; else estimated from its cores), memory, power profile;
per device pair: bandwidth and latency. Every plan's step ends with each worker's AdamW step over its
share's parameters.
The model, per parallelism (b samples per micro-batch, M micro-batches, S stages, L blocks):

- pipeline, data and pipeline × data: the step is replayed as a graph of each worker's work in the order
  its code runs it (`cetd.cluster.step_graph`): it takes in its micro-batches from the driver, runs its
  schedule's forwards (1/3 of a block's time) and backwards (2/3) as they become possible, each link
  carrying one activation or gradient at a time, then joins the replicas' loss all-gather, its chain's
  loss broadcast (which the last stage sends without waiting for the others to listen), the tied-weight
  sum between first and last stage, its stage's gradient all-reduce across replicas (every ``sync_every``
  steps), and steps its optimizer. Replica 0's last stage then sends the loss to the driver, which
  announces the next step and sends the micro-batches (a message per worker and per field, on the CPU of
  the device the job was submitted to, beside its worker where the plan uses it): a few steps are replayed
  back to back, and the step time is the steady spacing of those announcements. So work that overlaps in
  the real run (one worker's intake while another computes, the last stage's all-reduce while the first
  still runs backwards, a first stage's optimizer step while the driver already announces the next step)
  is not added up; for balanced stages and free links this is the familiar (M + S − 1) × stage time. A
  stage's time is b × its device's block seconds × (its blocks, plus the embedding's and head's extra
  load on the first and last stage), plus its CPU for the activations and gradients it sends and
  receives. Memory: GPipe
  keeps all M micro-batches' activations, 1F1B at most S − s on stage s. Data-parallel replicas train the
  micro-batches split evenly, so the slowest sets the pace.
- tensor: every block of every micro-batch waits for 4 all-reduces of the activation, each round a ring
  (2(k−1) messages of 1/k of it) or exchanged whole (k−1 messages of all of it, one round), as the plan's
  ``ring_min_bytes`` says (the planner sets it where the two cost the same, `tensor_ring_min_bytes`), each
  message paced by the slower of the link and the costliest member's CPU: communication-bound on home
  networks; then the slowest worker's optimizer step, the driver's round trip and the micro-batch intake
  are added.

Energy uses `cetd.cluster.power`'s stated model: each taking-part device is on for the whole step
(idle watts), busy for its compute time (watts per core × cores, or its accelerator's watts), and pays
per byte it sends and receives. Predictions are labelled as such; measurements replace them in reports.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from cetd.cluster.device_offer import (
    DeviceOffer,
    block_seconds_per_sample,
    estimated_block_seconds,
    messaging,
    optimizer_seconds_per_parameter,
    speed_source,
)
from cetd.cluster.driver_costs import (
    CONTROL_BYTES,
    DRIVER,
    DriverCosts,
    intakes,
    micro_samples,
    split_evenly,
)
from cetd.cluster.links import DEFAULT_LINK, Link, LinkMap, link_between, slowest_link
from cetd.cluster.power import BUILTIN_PROFILES, PowerProfile
from cetd.cluster.shape_costs import ModelCosts, in_flight, measured_costs, stage_memory
from cetd.cluster.step_graph import StepGraph
from cetd.cluster.transport_costs import (
    BUCKET_BYTES,
    Messaging,
    all_reduce_seconds,
    ring_all_reduce_seconds,
    ring_min_bytes,
    uses_ring,
)
from cetd.errors import JobError
from cetd.runtime.schedules import Action, ActionKind, build_schedule
from cetd.runtime.spec import JobPlan, JobSpec, ModelDescription, WorkerAssignment

__all__ = [
    "DEFAULT_LINK",
    "DEFAULT_PROFILE",
    "DeviceOffer",
    "Link",
    "Prediction",
    "block_seconds_per_sample",
    "boundary_seconds",
    "estimated_block_seconds",
    "link_between",
    "messaging",
    "optimizer_seconds_per_parameter",
    "power_profile",
    "predict",
    "ring_seconds",
    "speed_source",
    "stage_message_seconds",
    "tensor_ring_min_bytes",
]


DEFAULT_PROFILE = "laptop"

def power_profile(offer: DeviceOffer, profiles: Mapping[str, PowerProfile] | None) -> PowerProfile:
    """The device's profile: ``profiles[device_id]``, else its named built-in, else `DEFAULT_PROFILE`'s."""
    if profiles and offer.device_id in profiles:
        return profiles[offer.device_id]
    return BUILTIN_PROFILES.get(offer.power_profile or DEFAULT_PROFILE, BUILTIN_PROFILES[DEFAULT_PROFILE])


def ring_seconds(size: float, members: Sequence[DeviceOffer], link: Link, bucket_bytes: float = BUCKET_BYTES) -> float:
    """A ring all-reduce of ``size`` bytes among ``members`` over ``link``, paced by the costliest member's CPU."""
    return ring_all_reduce_seconds(size, len(members), link.bandwidth_bytes_per_second, link.latency_seconds,
                                   _costliest(members), bucket_bytes)


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    """The cost model's forecast for one plan. Everything here is predicted, not measured."""

    step_seconds: float
    seconds_per_sample: float
    joules_per_sample: float
    memory_bytes: dict[str, int]
    """Peak training memory per device ID."""
    busy_seconds: dict[str, float]
    """Compute time per step per device ID."""
    joules: dict[str, float] = field(default_factory=dict)
    """Joules per step per device ID (source: the power model)."""
    bytes_sent: dict[str, int] = field(default_factory=dict)
    """Bytes each device sends per step."""
    bottleneck: str = ""
    """The device (or ``link A-B``) that sets the pace."""
    notes: tuple[str, ...] = ()
    source: str = "model"
    block_seconds: dict[str, float] = field(default_factory=dict)
    """Per device ID: the block time per sample the forecast used."""
    speed_source: dict[str, str] = field(default_factory=dict)
    """Per device ID: where that time came from (`speed_source`)."""

    def fits(self, offers: Mapping[str, DeviceOffer]) -> bool:
        """Every device's predicted memory within what it offers."""
        return all(need <= offers[d].memory_bytes for d, need in self.memory_bytes.items())


def predict(spec: JobSpec, description: ModelDescription, plan: JobPlan, offers: Sequence[DeviceOffer], *,
            links: LinkMap | None = None, profiles: Mapping[str, PowerProfile] | None = None,
            costs: ModelCosts | None = None, driver: str | None = None) -> Prediction:
    """Forecast ``plan``'s step time, memory and energy on ``offers``.

    ``driver``: the device the job is submitted to, which runs its driver (`DriverCosts`); None or a device
    not offered: the driver is priced as the plan's device whose messages cost least, on a CPU of its own.

    Raises:
        JobError: the plan names a device that is not offered.
    """
    by_id = {o.device_id: o for o in offers}
    missing = sorted({w.device_id for w in plan.workers} - set(by_id))
    if missing:
        raise JobError(f"the plan names device(s) {', '.join(missing)} that are not available")
    costs = costs or measured_costs(spec, description, offers)
    speed = {d: block_seconds_per_sample(spec, description, o) for d, o in by_id.items()}
    timing: _Timing
    driving = DriverCosts(spec, plan, links, by_id, driver)
    if plan.parallelism == "tensor":
        timing = _tensor(spec, description, costs, plan, speed, links, by_id)
        _add_optimizer_steps(timing, description, costs, plan, by_id)
        _add_step_overhead(timing, spec, plan, by_id, driving)
    else:
        timing = _replicated(spec, description, costs, plan, speed, links, by_id, driving)
    joules: dict[str, float] = {}
    for device_id in timing.memory:
        joules[device_id] = _device_joules(by_id[device_id], profiles, timing.step, timing.busy[device_id],
                                           timing.sent[device_id], timing.received[device_id])
    if driving.device is not None and driving.device not in joules:
        # The device the job was submitted to runs its driver though the plan leaves it out, and the job's
        # reported joules count it (idle for the step, busy for the driver's CPU): so does the forecast, or
        # the energy objective would favour a plan for leaving its own submitter out.
        joules[driving.device] = _device_joules(by_id[driving.device], profiles, timing.step, driving.seconds,
                                                driving.bytes_sent, driving.bytes_received)
    samples = spec.global_batch
    return Prediction(
        step_seconds=timing.step, seconds_per_sample=timing.step / samples,
        joules_per_sample=sum(joules.values()) / samples, memory_bytes=timing.memory, busy_seconds=timing.busy,
        joules=joules, bytes_sent={d: round(b) for d, b in timing.sent.items()}, bottleneck=timing.bottleneck,
        notes=tuple(timing.notes), block_seconds={d: speed[d] for d in timing.memory},
        speed_source={d: speed_source(by_id[d]) for d in timing.memory},
    )


def _device_joules(offer: DeviceOffer, profiles: Mapping[str, PowerProfile] | None, step: float, busy: float,
                   sent: float, received: float) -> float:
    """One device's joules per step: idle for the step, busy watts for its busy seconds, and its bytes."""
    profile = power_profile(offer, profiles)
    busy_watts = profile.accelerator_watts if offer.accelerator else profile.watts_per_core * offer.cores
    return (profile.idle_watts * step + busy_watts * busy + sent * profile.joules_per_byte_sent
            + received * profile.joules_per_byte_received)


@dataclass(slots=True)
class _Timing:
    step: float = 0.0
    bottleneck: str = ""
    memory: dict[str, int] = field(default_factory=dict)
    busy: dict[str, float] = field(default_factory=dict)
    sent: dict[str, float] = field(default_factory=dict)
    received: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, device_id: str, *, memory: int, busy: float, sent: float, received: float) -> None:
        self.memory[device_id] = memory
        self.busy[device_id] = busy
        self.sent[device_id] = sent
        self.received[device_id] = received


def _gradient_sync(spec: JobSpec, parameters: int, number_bytes: int, members: Sequence[DeviceOffer],
                   links: LinkMap | None) -> tuple[float, float]:
    """Seconds per step (amortised over ``sync_every``) and bytes each member sends per step."""
    if len(members) <= 1:
        return 0.0, 0.0
    size = parameters * number_bytes
    seconds = ring_seconds(size, members, slowest_link(links, members)) / spec.sync_every
    return seconds, 2 * (len(members) - 1) / len(members) * size / spec.sync_every


def _costliest(members: Sequence[DeviceOffer]) -> Messaging:
    return Messaging.slowest(messaging(m) for m in members)


def _pace(links: LinkMap | None, members: Sequence[DeviceOffer]) -> tuple[Link, Messaging]:
    """What paces a collective among ``members``: their slowest link and their costliest CPU per message."""
    return slowest_link(links, members), _costliest(members)


def _hop(links: LinkMap | None, members: Sequence[DeviceOffer], nbytes: float = 64.0) -> float:
    """One small message among ``members``: the slower of the slowest link and the costliest CPU."""
    link, cpu = _pace(links, members)
    return max(link.latency_seconds + nbytes / link.bandwidth_bytes_per_second, cpu.hops(1, nbytes))


def tensor_ring_min_bytes(members: Sequence[DeviceOffer], links: LinkMap | None) -> int:
    """The size from which ``members``' tensor-parallel all-reduces should go round a ring rather than be
    exchanged whole (`JobPlan.ring_min_bytes`), for their costliest messages and slowest link."""
    link, cpu = _pace(links, members)
    return ring_min_bytes(len(members), link.bandwidth_bytes_per_second, link.latency_seconds, cpu)


def _tensor(spec: JobSpec, description: ModelDescription, costs: ModelCosts, plan: JobPlan,
            speed: Mapping[str, float], links: LinkMap | None, offers: Mapping[str, DeviceOffer]) -> _Timing:
    timing = _Timing()
    ordered = sorted(plan.workers, key=lambda w: w.tp_index)
    ways = len(ordered)
    heads = split_evenly(description.num_heads, ways)
    micro = micro_samples(spec)
    members = [offers[w.device_id] for w in ordered]
    size = costs.boundary_bytes_per_sample * micro
    link, cpu = _pace(links, members)
    reduce = all_reduce_seconds(size, ways, link.bandwidth_bytes_per_second, link.latency_seconds, cpu,
                                plan.ring_min_bytes)
    ring = uses_ring(size, ways, plan.ring_min_bytes)
    block = max(_shard_block_seconds(micro * speed[w.device_id], offers[w.device_id], h / description.num_heads)
                for w, h in zip(ordered, heads, strict=True))
    ends = max(micro * speed[w.device_id] * (costs.embedding_blocks + costs.head_blocks) for w in ordered)
    per_micro = description.num_blocks * (block + 4 * reduce) + ends
    timing.step = spec.micro_batches * per_micro
    per_reduce = 2 * (ways - 1) / ways * size if ring else (ways - 1) * size
    sent = 4 * description.num_blocks * spec.micro_batches * per_reduce if ways > 1 else 0.0
    for worker, share in zip(ordered, heads, strict=True):
        whole = micro * speed[worker.device_id]
        busy = spec.micro_batches * (
            description.num_blocks * _shard_block_seconds(whole, offers[worker.device_id], share / description.num_heads)
            + whole * (costs.embedding_blocks + costs.head_blocks))
        memory = stage_memory(spec, costs, blocks=description.num_blocks, first=True, last=True, in_flight=1,
                              tensor_ways=ways)
        timing.add(worker.device_id, memory=memory, busy=busy, sent=sent, received=sent)
    comm = spec.micro_batches * description.num_blocks * 4 * reduce
    timing.bottleneck = "network" if comm > timing.step / 2 else max(timing.busy, key=lambda d: timing.busy[d])
    timing.notes.append(f"{4 * description.num_blocks * spec.micro_batches} all-reduces of {size / 1024:.0f} KiB "
                        f"({'round a ring' if ring else 'exchanged whole'}) take {comm:.3f} s of the "
                        f"{timing.step:.3f} s step")
    return timing


def _shard_block_seconds(whole: float, offer: DeviceOffer, fraction: float) -> float:
    """A tensor-parallel slice of a block (``fraction`` of its heads): the fixed part stays whole."""
    fixed = min(offer.block_fixed_seconds or 0.0, whole)
    return fixed + (whole - fixed) * fraction


def pipeline_seconds(stage_times: Sequence[float], link_times: Sequence[float], micro_batches: int) -> float:
    """Σ r_i + (M − 1) × max r_i over the chain of stages and links (the bubble-aware makespan): what the
    planner's boundary search minimises; the forecast itself replays the step (`_replicated`)."""
    resources = [*stage_times, *link_times]
    return sum(resources) + (micro_batches - 1) * max(resources)


def boundary_seconds(costs: ModelCosts, micro: int, link: Link) -> float:
    """One micro-batch's activation forward and gradient back over ``link`` (the network's part)."""
    one_way = costs.boundary_bytes_per_sample * micro / link.bandwidth_bytes_per_second + link.latency_seconds
    return 2 * one_way if link.half_duplex else one_way


def stage_message_seconds(costs: ModelCosts, micro: int, offer: DeviceOffer, *, first: bool, last: bool) -> float:
    """A stage's CPU time per micro-batch for its activations and gradients: a stage after the first receives
    an activation and sends a gradient, a stage before the last sends one and receives one."""
    ends = 2 * ((not first) + (not last))
    return messaging(offer).ends(ends, costs.boundary_bytes_per_sample * micro)


FORWARD_SHARE = 1 / 3
"""A forward's share of a block's forward+backward time (the backward computes two gradients per weight)."""


REPLAYED_STEPS = 4
"""Steps the forecast replays back to back. The driver starts a step once the loss of the one before
reaches it, so a worker off the loss's path (a first stage's gradient sync and optimizer step) may still
be busy when the next step begins; the step time is the steady spacing of the driver's announcements."""
WARM_STEPS = 2
"""Replayed steps left out of that spacing: the first, which starts with every device idle, and one more
for a lag carried from step to step to show."""


def _replicated(spec: JobSpec, description: ModelDescription, costs: ModelCosts, plan: JobPlan,
                speed: Mapping[str, float], links: LinkMap | None, offers: Mapping[str, DeviceOffer],
                driving: DriverCosts) -> _Timing:
    """Data-parallel, pipeline and pipeline × data plans (a single device is one replica of one stage),
    replayed as a `StepGraph` over `REPLAYED_STEPS` steps: each worker takes in the driver's control and
    its micro-batches, runs its schedule, joins the loss agreement and the gradient all-reduces, and steps
    its optimizer, every part at its own pace; replica 0's last stage then sends the loss to the driver,
    which announces the next step."""
    steps = _ReplicatedSteps(spec, description, costs, plan, speed, links, offers, driving)
    for step in range(REPLAYED_STEPS):
        steps.add(step)
    timing = steps.timing
    replay = steps.graph.replay(end=(REPLAYED_STEPS - 1, DRIVER))
    announced_at = [replay.finish[(step, DRIVER)] for step in range(WARM_STEPS - 1, REPLAYED_STEPS)]
    timing.step = (announced_at[-1] - announced_at[0]) / (len(announced_at) - 1)
    timing.bottleneck = replay.bottleneck
    if len(steps.chains) > 1:
        kind = "pipeline replicas" if len(steps.chains[0]) > 1 else "data-parallel replicas"
        timing.notes.append(f"{len(steps.chains)} {kind}; gradient all-reduce {steps.sync:.3f} s per step "
                            f"(every {spec.sync_every} step(s))")
    if steps.slowest_optimizer > 0:
        timing.notes.append(f"optimizer step {steps.slowest_optimizer:.3f} s")
    timing.notes.append(driving.note())
    return timing


class _ReplicatedSteps:
    """`_replicated`'s step graph, built one step at a time in the order each worker's code runs.

    The first step also fills in `timing`'s memory, busy seconds and bytes: every step is alike.
    """

    def __init__(self, spec: JobSpec, description: ModelDescription, costs: ModelCosts, plan: JobPlan,
                 speed: Mapping[str, float], links: LinkMap | None, offers: Mapping[str, DeviceOffer],
                 driving: DriverCosts) -> None:
        self.spec, self.description, self.costs, self.plan, self.driving = spec, description, costs, plan, driving
        self.speed, self.links, self.offers = speed, links, offers
        replicas: dict[int, list[WorkerAssignment]] = {}
        for worker in plan.workers:
            replicas.setdefault(worker.dp_index, []).append(worker)
        self.chains = [sorted(chain, key=lambda w: w.stage) for _, chain in sorted(replicas.items())]
        self.intakes = intakes(spec, plan)
        self.shares = [self.intakes[chain[0].rank].micro_batches for chain in self.chains]
        self.schedules: list[list[list[Action]]] = [
            build_schedule(spec.schedule, len(chain), share) if share else [[] for _ in chain]
            for chain, share in zip(self.chains, self.shares, strict=True)]
        self.boundary = costs.boundary_bytes_per_sample * micro_samples(spec)
        self.ends = [chain[-1].device_id for chain in self.chains]
        self.reporter = self.ends[0]  # the worker that sends the loss (`cetd.runtime.job_protocol.loss_rank`)
        self.report = messaging(offers[self.reporter]).ends(1, CONTROL_BYTES)
        self.graph = StepGraph()
        self.timing = _Timing()
        self.sync = 0.0
        self.slowest_optimizer = 0.0

    def add(self, step: int) -> None:
        """One step: schedules, loss agreement, gradient syncs, optimizer steps, the loss to the driver."""
        for replica in range(len(self.chains)):
            for position in range(len(self.chains[replica])):
                self._add_schedule(step, replica, position)
        # The replicas' last stages all-gather their losses; each chain's last stage tells the chain.
        if len(self.ends) > 1:
            self.graph.add((step, "loss"), self.ends,
                           (len(self.ends) - 1) * _hop(self.links, [self.offers[d] for d in self.ends]))
        for replica, chain in enumerate(self.chains):
            if len(chain) > 1:
                self._add_verdict(step, replica)
                if _tied(self.description):
                    # A tied weight's gradients are summed between the first and the last stage.
                    pair = [self.offers[chain[0].device_id], self.offers[chain[-1].device_id]]
                    tied = ring_seconds(self.costs.last_parameters * self.costs.number_bytes, pair,
                                        slowest_link(self.links, pair))
                    self.graph.add((step, "tied", replica), [d.device_id for d in pair], tied)
        if len(self.chains) > 1:
            for stage in range(max(len(c) for c in self.chains)):
                self._add_gradient_sync(step, stage)
        for worker in self.plan.workers:
            seconds = _optimizer_seconds(self.description, self.costs, self.plan, worker, self.offers)
            self._add_work((step, "optimizer", worker.device_id), worker.device_id, seconds, step == 0)
            self.slowest_optimizer = max(self.slowest_optimizer, seconds)
        reported = self._add_work((step, "report"), self.reporter, self.report, step == 0)
        driving = self.driving
        if step == 0:
            driving.charge(self.timing.busy)
        self.graph.add((step, DRIVER), driving.resource, driving.seconds,
                       after=[(reported, driving.latency(self.reporter))])

    def _add_work(self, name: Hashable, device_id: str, seconds: float, count: bool,
                  after: Sequence[tuple[Hashable, float]] = ()) -> Hashable:
        """A task of one device's CPU; ``count``: add it to the device's busy seconds."""
        if count:
            self.timing.busy[device_id] += seconds
        return self.graph.add(name, device_id, seconds, after=after)

    def _add_schedule(self, step: int, replica: int, position: int) -> None:
        """One worker's intake and its schedule's forwards and backwards."""
        spec, costs, chain = self.spec, self.costs, self.chains[replica]
        worker = chain[position]
        device_id, offer = worker.device_id, self.offers[worker.device_id]
        stages = len(chain)
        taken = self.intakes[worker.rank]
        first, last, share = taken.first, taken.last, taken.micro_batches
        if step == 0:
            sent = share * self.boundary * ((not last) + (not first))
            # A replica keeps only its own share of the micro-batches in flight; a data-parallel worker runs
            # each micro-batch's backward right after its forward, whatever the pipeline schedule.
            keep = (1 if self.plan.parallelism != "pipeline" else share if spec.schedule == "gpipe"
                    else min(share, in_flight(spec, position, stages)))
            memory = stage_memory(spec, costs, blocks=worker.end_block - worker.start_block, first=first, last=last,
                                  in_flight=keep)
            self.timing.add(device_id, memory=memory, busy=0.0, sent=sent, received=sent)
        load = (worker.end_block - worker.start_block + (costs.embedding_blocks if first else 0.0)
                + (costs.head_blocks if last else 0.0))
        compute = micro_samples(spec) * self.speed[device_id] * load
        # Per micro-batch, a forward receives an activation (not on the first stage) and sends one (not on
        # the last); a backward receives a gradient (not on the last) and sends one (not on the first).
        message = messaging(offer).ends((not first) + (not last), self.boundary)
        # The driver announces the step, then sends the micro-batches: the worker waits for both.
        announced = [((step - 1, DRIVER), self.driving.latency(device_id, taken.nbytes(spec)))] if step else []
        self._add_work((step, "intake", device_id), device_id, taken.seconds(spec, offer), step == 0, after=announced)
        for action in self.schedules[replica][position]:
            forward = action.kind is ActionKind.FORWARD
            after: list[tuple[Hashable, float]] = []
            if forward and not first:
                source = (step, "F", replica, position - 1, action.micro_batch)
                after.append(_transfer(self.graph, self.links, source, chain[position - 1].device_id, device_id,
                                       self.boundary))
            if not forward and not last:
                source = (step, "B", replica, position + 1, action.micro_batch)
                after.append(_transfer(self.graph, self.links, source, chain[position + 1].device_id, device_id,
                                       self.boundary))
            seconds = compute * (FORWARD_SHARE if forward else 1 - FORWARD_SHARE) + message
            self._add_work((step, action.kind.value, replica, position, action.micro_batch), device_id, seconds,
                           step == 0, after=after)

    def _add_verdict(self, step: int, replica: int) -> None:
        """The chain's last stage sends the step's loss to its other stages
        (`cetd.runtime.pipeline.PipelineStageRunner`): it goes on without waiting for them, and each hears
        it once it was sent and the stage is free."""
        chain = self.chains[replica]
        root = chain[-1].device_id
        told = self._add_work((step, "verdict", replica), root,
                              messaging(self.offers[root]).ends(len(chain) - 1, CONTROL_BYTES), step == 0)
        for worker in chain[:-1]:
            device_id = worker.device_id
            self._add_work((step, "heard", replica, device_id), device_id,
                           messaging(self.offers[device_id]).ends(1, CONTROL_BYTES), step == 0,
                           after=[(told, link_between(self.links, root, device_id).latency_seconds)])

    def _add_gradient_sync(self, step: int, stage: int) -> None:
        """The stage's gradient all-reduce across the replicas that have it."""
        group = [c[stage] for c in self.chains if stage < len(c)]
        parameters = (_stage_parameters(self.costs, group[0], stage, len(self.chains[0])) if len(self.chains[0]) > 1
                      else self.description.parameter_count)
        seconds, volume = _gradient_sync(self.spec, parameters, self.costs.number_bytes,
                                         [self.offers[w.device_id] for w in group], self.links)
        self.graph.add((step, "sync", stage), [w.device_id for w in group], seconds)
        self.sync = max(self.sync, seconds)
        if step == 0:
            for worker in group:
                self.timing.sent[worker.device_id] += volume
                self.timing.received[worker.device_id] += volume


def _transfer(graph: StepGraph, links: LinkMap | None, producer: tuple[int, str, int, int, int], source: str,
              target: str, nbytes: float) -> tuple[Hashable, float]:
    """``producer``'s output sent from ``source`` to ``target`` over their link, one direction of which
    carries one tensor at a time (a half-duplex link, both directions: each takes twice as long).

    Returns:
        The (task, latency) that the receiving task waits for.
    """
    link = link_between(links, source, target)
    seconds = nbytes / link.bandwidth_bytes_per_second * (2 if link.half_duplex else 1)
    name = ("send", *producer)
    graph.add(name, f"link {source}-{target}", seconds, after=[(producer, 0.0)])
    return name, link.latency_seconds


def _tied(description: ModelDescription) -> bool:
    return description.task == "causal_lm" and bool(description.config.get("tie_word_embeddings", True))


def _add_step_overhead(timing: _Timing, spec: JobSpec, plan: JobPlan, offers: Mapping[str, DeviceOffer],
                       driving: DriverCosts) -> None:
    """What a tensor-parallel step adds outside its blocks: the loss crosses to the driver, which sends the
    next step's control and micro-batches (`DriverCosts`), and each worker takes in every micro-batch's
    fields once they crossed back."""
    taken = intakes(spec, plan).values()
    reporter = min(plan.workers, key=lambda w: w.rank).device_id  # `cetd.runtime.job_protocol.loss_rank`
    overhead = (driving.latency(reporter) + driving.seconds
                + max(driving.latency(i.worker.device_id, i.nbytes(spec)) + i.seconds(spec, offers[i.worker.device_id])
                      for i in taken))
    timing.step += overhead
    for intake in taken:
        timing.busy[intake.worker.device_id] += intake.seconds(spec, offers[intake.worker.device_id])
    driving.charge(timing.busy)
    timing.notes.append(f"{driving.note()}; round trip with the micro-batch intake {overhead:.3f} s per step")


def _worker_parameters(description: ModelDescription, costs: ModelCosts, plan: JobPlan,
                       worker: WorkerAssignment) -> int:
    """Parameters the worker's optimizer steps over (a pipeline stage, a tensor-parallel slice, or all)."""
    if plan.parallelism == "pipeline":
        stages = 1 + max(w.stage for w in plan.workers if w.dp_index == worker.dp_index)
        return _stage_parameters(costs, worker, worker.stage, stages)
    if plan.parallelism == "tensor":
        return costs.ends_parameters + description.num_blocks * costs.block_parameters // len(plan.workers)
    return description.parameter_count


def _optimizer_seconds(description: ModelDescription, costs: ModelCosts, plan: JobPlan, worker: WorkerAssignment,
                       offers: Mapping[str, DeviceOffer]) -> float:
    """The worker's AdamW step over its parameters."""
    return (_worker_parameters(description, costs, plan, worker)
            * optimizer_seconds_per_parameter(offers[worker.device_id]))


def _add_optimizer_steps(timing: _Timing, description: ModelDescription, costs: ModelCosts, plan: JobPlan,
                         offers: Mapping[str, DeviceOffer]) -> None:
    """Every tensor-parallel worker ends the step with AdamW over its slice; the step waits for the slowest."""
    slowest = 0.0
    for worker in plan.workers:
        seconds = _optimizer_seconds(description, costs, plan, worker, offers)
        timing.busy[worker.device_id] += seconds
        slowest = max(slowest, seconds)
    timing.step += slowest
    if slowest > 0:
        timing.notes.append(f"optimizer step {slowest:.3f} s")


def _stage_parameters(costs: ModelCosts, worker: WorkerAssignment, stage: int, stages: int) -> int:
    parameters = (worker.end_block - worker.start_block) * costs.block_parameters
    if stage == 0:
        parameters += costs.first_parameters if stages > 1 else costs.ends_parameters
    if stage == stages - 1 and stages > 1:
        parameters += costs.last_parameters
    return parameters
