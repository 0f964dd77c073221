"""The job planner: which devices take part, with which parallelism and which share of the model.

Pure: a function of the job, the model's description, the devices on offer (with their measured speed,
memory and power profile) and the links between them. It enumerates candidate plans — one device;
data parallel over the fastest devices; tensor parallel; pipelines over subsets and orders of the
devices with stage boundaries from an exact search; pipeline × data hybrids — prices each
with `cetd.cluster.cost_model.predict`, drops every one that would exceed any device's memory, and keeps
the best for the objective (``throughput``: seconds per sample; ``energy``: joules per sample). A device
left out is named in the plan's reason with what including it would cost. It refuses with a sentence
when no plan fits.

Stage boundaries: for a chain of devices the pipeline step is Σ r + (M − 1) × max r over stage and link
times r. For every candidate bound B on the slowest stage, a dynamic programme over (stage, first block)
finds the boundaries with the least total stage time whose stages all stay within B and within memory;
the best B wins. That is exact for the cost model, and cheap because B stops growing once (M − 1) × B
alone exceeds the best step found. The replicas of a pipeline × data hybrid share their boundaries (each
stage's gradients are summed across its replicas), found by the same search over each stage position's
slowest device, smallest memory and slowest link. Boundaries always minimise time (the fastest split of
a given chain also keeps every device on for the least time); the energy objective acts through which
devices, chains and parallelism are chosen.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from cetd.cluster.cost_model import (
    DeviceOffer,
    Prediction,
    block_seconds_per_sample,
    boundary_seconds,
    power_profile,
    predict,
    stage_message_seconds,
    tensor_ring_min_bytes,
)
from cetd.cluster.links import LinkMap, link_between
from cetd.cluster.power import PowerProfile
from cetd.cluster.shape_costs import (
    OPTIMIZER_COPIES,
    RUNTIME_OVERHEAD_BYTES,
    ModelCosts,
    activation_bytes,
    bytes_per_number,
    in_flight,
    measured_costs,
    stage_memory,
    training_memory,
)
from cetd.errors import JobError
from cetd.runtime.spec import JobPlan, JobSpec, ModelDescription, Objective, Parallelism, WorkerAssignment

__all__ = [
    "OPTIMIZER_COPIES",
    "RUNTIME_OVERHEAD_BYTES",
    "DeviceOffer",
    "PlannedJob",
    "activation_bytes",
    "bytes_per_number",
    "even_pipeline_plan",
    "pipeline_plan",
    "plan_job",
    "plan_with_prediction",
    "split_blocks",
    "training_memory",
    "what_if",
]

EXHAUSTIVE_DEVICES = 5
"""Up to this many devices every subset is tried; above it, the fastest, the roomiest and the thriftiest."""

_INFINITY = float("inf")

_T = TypeVar("_T")


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def split_blocks(num_blocks: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous block ranges, the remainder going to the middle stages (the ends carry embedding/head)."""
    if not 1 <= stages <= num_blocks:
        raise JobError(f"cannot split {num_blocks} blocks into {stages} pipeline stages")
    base, extra = divmod(num_blocks, stages)
    sizes = [base] * stages
    middle = list(range(1, stages - 1)) or list(range(stages))
    for i in range(extra):
        sizes[middle[i % len(middle)]] += 1
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedJob:
    """A plan with the cost model's forecast for it."""

    plan: JobPlan
    prediction: Prediction
    left_out: dict[str, str] = field(default_factory=dict)
    """Device ID → why it does not take part."""


@dataclass(slots=True)
class _Search:
    spec: JobSpec
    description: ModelDescription
    offers: list[DeviceOffer]
    objective: Objective
    profiles: Mapping[str, PowerProfile] | None
    links: LinkMap | None
    costs: ModelCosts
    speed: dict[str, float]
    driver: str | None = None
    found: list[PlannedJob] = field(default_factory=list)
    tried: int = 0

    def score(self, candidate: PlannedJob) -> tuple[float, float]:
        p = candidate.prediction
        if self.objective == "energy":
            return (p.joules_per_sample, p.seconds_per_sample)
        return (p.seconds_per_sample, p.joules_per_sample)

    def value(self, candidate: PlannedJob) -> float:
        return self.score(candidate)[0]

    def consider(self, plan: JobPlan) -> PlannedJob | None:
        """Forecast ``plan`` and keep it if it fits every device's memory (returned, else None)."""
        self.tried += 1
        prediction = predict(self.spec, self.description, plan, self.offers, links=self.links,
                             profiles=self.profiles, costs=self.costs, driver=self.driver)
        limits = {o.device_id: o.memory_bytes for o in self.offers}
        if not all(need <= limits[d] for d, need in prediction.memory_bytes.items()):
            return None
        found = PlannedJob(plan=plan, prediction=prediction)
        self.found.append(found)
        return found

    def consider_pipelines(self, chains: Sequence[Sequence[DeviceOffer]], ranges: Sequence[tuple[int, int]]) -> None:
        """Consider ``chains`` (pipeline replicas) sharing the stage boundaries ``ranges``, then move one
        boundary by one block at a time while the forecast improves.

        `_partition` is exact for the bubble formula Σ r + (M − 1) × max r; the forecast replays the step
        (`cetd.cluster.step_graph`), where forwards, backwards, intake and all-reduces overlap, so its
        optimum can sit a block or two away.
        """
        best = self.consider(self._pipelines(chains, ranges))
        current = list(ranges)
        seen = {tuple(current)}
        while best is not None:
            moves = []
            for b in range(len(current) - 1):
                for shift in (-1, 1):
                    cut = current[b][1] + shift
                    moved = [*current[:b], (current[b][0], cut), (cut, current[b + 1][1]), *current[b + 2:]]
                    if current[b][0] < cut < current[b + 1][1] and tuple(moved) not in seen:
                        seen.add(tuple(moved))
                        found = self.consider(self._pipelines(chains, moved))
                        if found is not None:
                            moves.append((self.score(found), moved, found))
            improving = [m for m in moves if m[0] < self.score(best)]
            if not improving:
                return
            _, current, best = min(improving, key=lambda m: m[0])

    def _pipelines(self, chains: Sequence[Sequence[DeviceOffer]], ranges: Sequence[tuple[int, int]]) -> JobPlan:
        stages = len(ranges)
        workers = [w for r, chain in enumerate(chains)
                   for w in pipeline_plan(self.spec, chain, ranges, replica=r, first_rank=r * stages + 1).workers]
        return _plan("pipeline", workers, self.spec)


def _plan(parallelism: Parallelism, workers: Iterable[WorkerAssignment], spec: JobSpec) -> JobPlan:
    return JobPlan(parallelism=parallelism, workers=tuple(workers), schedule=spec.schedule,
                   micro_batches=spec.micro_batches)


def _whole_workers(devices: Sequence[DeviceOffer], num_blocks: int, *, tensor: bool) -> list[WorkerAssignment]:
    return [WorkerAssignment(rank=i + 1, device_id=d.device_id, end_block=num_blocks,
                             tp_index=i if tensor else 0, dp_index=0 if tensor else i)
            for i, d in enumerate(devices)]


def pipeline_plan(spec: JobSpec, chain: Sequence[DeviceOffer], ranges: Sequence[tuple[int, int]], *,
                  replica: int = 0, first_rank: int = 1) -> JobPlan:
    """A pipeline over ``chain`` (stage order) with the given block ranges."""
    workers = [WorkerAssignment(rank=first_rank + s, device_id=d.device_id, stage=s, start_block=start,
                                end_block=end, dp_index=replica)
               for s, (d, (start, end)) in enumerate(zip(chain, ranges, strict=True))]
    return _plan("pipeline", workers, spec)


def even_pipeline_plan(spec: JobSpec, description: ModelDescription, chain: Sequence[DeviceOffer]) -> JobPlan:
    """The speed-blind pipeline: `split_blocks` over ``chain``."""
    return pipeline_plan(spec, chain, split_blocks(description.num_blocks, len(chain)))


@dataclass(frozen=True, slots=True)
class _StageLimits:
    """What the boundary search needs of a chain of stage positions (one pipeline, or R alike replicas)."""

    speeds: list[float]
    """Per stage: block seconds per sample (the slowest device at that position)."""
    memories: list[int]
    """Per stage: memory bytes (the smallest at that position)."""
    links: list[float]
    """Per boundary between stage s and s + 1: one micro-batch's seconds over it (the slowest link)."""
    messages: list[float]
    """Per stage: its CPU seconds per micro-batch for sending and receiving activations and gradients."""


def _stage_limits(search: _Search, chains: Sequence[Sequence[DeviceOffer]]) -> _StageLimits:
    """Each stage position's slowest speed and smallest memory, and each boundary's slowest link, over
    ``chains`` (equal-length device chains that will share stage boundaries)."""
    micro = max(1, search.spec.global_batch // search.spec.micro_batches)
    positions = list(zip(*chains, strict=True))
    return _StageLimits(
        speeds=[max(search.speed[d.device_id] for d in column) for column in positions],
        memories=[min(d.memory_bytes for d in column) for column in positions],
        links=[max(boundary_seconds(search.costs, micro, link_between(search.links, a.device_id, b.device_id))
                   for a, b in zip(here, there, strict=True))
               for here, there in itertools.pairwise(positions)],
        messages=[max(stage_message_seconds(search.costs, micro, d, first=s == 0, last=s == len(positions) - 1)
                      for d in column) for s, column in enumerate(positions)],
    )


def _partition(search: _Search, limits: _StageLimits, micro_batches: int) -> list[tuple[int, int]] | None:
    """The stage boundaries minimising Σ stage times + (M − 1) × the slowest (stages and links), within memory."""
    spec, costs, blocks = search.spec, search.costs, search.description.num_blocks
    stages = len(limits.speeds)
    if not 1 <= stages <= blocks:
        return None
    micro = max(1, spec.global_batch // spec.micro_batches)
    link_sum, link_max = sum(limits.links), max(limits.links, default=0.0)
    # time[s][i][j]: stage s holding blocks [i, j); infinite where it would not fit in memory.
    time = [[[_INFINITY] * (blocks + 1) for _ in range(blocks + 1)] for _ in range(stages)]
    for s, (speed, memory) in enumerate(zip(limits.speeds, limits.memories, strict=True)):
        rate = micro * speed
        extra = (costs.embedding_blocks if s == 0 else 0.0) + (costs.head_blocks if s == stages - 1 else 0.0)
        keep = in_flight(spec, s, stages)
        for i in range(s, blocks - (stages - s) + 1):
            for j in range(i + 1, blocks - (stages - s - 1) + 1):
                need = stage_memory(spec, costs, blocks=j - i, first=s == 0, last=s == stages - 1, in_flight=keep)
                if need <= memory:
                    time[s][i][j] = rate * (j - i + extra) + limits.messages[s]

    def least_sum(bound: float) -> tuple[float, list[tuple[int, int]]]:
        best = [[_INFINITY] * (blocks + 1) for _ in range(stages + 1)]
        choice = [[0] * (blocks + 1) for _ in range(stages + 1)]
        best[stages][blocks] = 0.0
        for s in range(stages - 1, -1, -1):
            for i in range(blocks):
                for j in range(i + 1, blocks + 1):
                    t = time[s][i][j]
                    if t <= bound and t + best[s + 1][j] < best[s][i]:
                        best[s][i], choice[s][i] = t + best[s + 1][j], j
        if best[0][0] == _INFINITY:
            return _INFINITY, []
        ranges, start = [], 0
        for s in range(stages):
            ranges.append((start, choice[s][start]))
            start = choice[s][start]
        return best[0][0], ranges

    floor, _ = least_sum(_INFINITY)
    if floor == _INFINITY:
        return None
    bounds = sorted({t for row in time for line in row for t in line if t < _INFINITY})
    best_step, best_ranges = _INFINITY, None
    for bound in bounds:
        if floor + link_sum + (micro_batches - 1) * max(bound, link_max) >= best_step:
            break
        total, ranges = least_sum(bound)
        if total == _INFINITY:
            continue
        step = total + link_sum + (micro_batches - 1) * max(bound, link_max)
        if step < best_step:
            best_step, best_ranges = step, ranges
    return best_ranges


def _orders(search: _Search, devices: Sequence[DeviceOffer]) -> Iterable[list[DeviceOffer]]:
    """Stage orders worth trying. With uniform links only the ends matter (embedding first, head last)."""
    ordered = sorted(devices, key=lambda d: (search.speed[d.device_id], d.device_id))
    return _stage_orders(ordered, exhaustive=bool(search.links))


def _stage_orders(ordered: Sequence[_T], *, exhaustive: bool) -> Iterable[list[_T]]:
    """Orders of ``ordered`` (fastest first) to try: all of them for two, or up to five when ``exhaustive``
    (the links differ); else every choice of first and last stage with the rest fastest first."""
    if len(ordered) <= 2 or (exhaustive and len(ordered) <= 5):
        yield from (list(p) for p in itertools.permutations(ordered))
        return
    for first, last in itertools.permutations(range(len(ordered)), 2):
        yield [ordered[first], *(x for i, x in enumerate(ordered) if i not in (first, last)), ordered[last]]


def _subsets(search: _Search, count: int) -> list[tuple[DeviceOffer, ...]]:
    """Device subsets of size ``count``: all of them for few devices, else the most promising few."""
    offers = search.offers
    if len(offers) <= EXHAUSTIVE_DEVICES:
        return list(itertools.combinations(offers, count))

    def thrift(d: DeviceOffer) -> float:
        profile = power_profile(d, search.profiles)
        watts = profile.accelerator_watts if d.accelerator else profile.watts_per_core * d.cores
        return search.speed[d.device_id] * (watts + profile.idle_watts)

    keys = (lambda d: search.speed[d.device_id], lambda d: -d.memory_bytes, thrift)
    picks = {tuple(sorted(offers, key=lambda d: (key(d), d.device_id))[:count]) for key in keys}
    return sorted(picks, key=lambda group: [d.device_id for d in group])


def _counts(search: _Search, limit: int) -> range:
    if search.spec.devices:
        return range(search.spec.devices, search.spec.devices + 1) if search.spec.devices <= limit else range(0)
    return range(2, limit + 1)


def _search_single(search: _Search) -> None:
    if search.spec.devices > 1:
        return
    for device in search.offers:
        search.consider(_plan("single", _whole_workers([device], search.description.num_blocks, tensor=False),
                              search.spec))


def _search_data(search: _Search) -> None:
    for count in _counts(search, min(len(search.offers), search.spec.micro_batches)):
        for group in _subsets(search, count):
            ordered = sorted(group, key=lambda d: (search.speed[d.device_id], d.device_id))
            search.consider(_plan("data", _whole_workers(ordered, search.description.num_blocks, tensor=False),
                                  search.spec))


def _search_tensor(search: _Search) -> None:
    for count in _counts(search, min(len(search.offers), search.description.num_heads)):
        for group in _subsets(search, count):
            ordered = sorted(group, key=lambda d: (search.speed[d.device_id], d.device_id))
            plan = _plan("tensor", _whole_workers(ordered, search.description.num_blocks, tensor=True), search.spec)
            search.consider(replace(plan, ring_min_bytes=tensor_ring_min_bytes(ordered, search.links)))


def _search_pipeline(search: _Search) -> None:
    for count in _counts(search, min(len(search.offers), search.description.num_blocks)):
        for group in _subsets(search, count):
            for chain in _orders(search, group):
                ranges = _partition(search, _stage_limits(search, [chain]), search.spec.micro_batches)
                if ranges is not None:
                    search.consider_pipelines([chain], ranges)


def _replica_counts(search: _Search) -> range:
    """Pipeline replica counts to try: exactly ``spec.replicas`` when it asks for some, none when it
    forbids them or synchronises less often than every step, else 2 up to the micro-batches."""
    spec = search.spec
    if spec.replicas == 1 or spec.sync_every != 1:
        return range(0)
    if spec.replicas > 1:
        fits = spec.replicas <= min(len(search.offers), spec.micro_batches)
        return range(spec.replicas, spec.replicas + 1) if fits else range(0)
    return range(2, min(len(search.offers) // 2, spec.micro_batches) + 1)


def _search_hybrid(search: _Search) -> None:
    """R replicas of an S-stage pipeline (pipeline × data) that share their stage boundaries.

    A subset of R × S devices is dealt by speed into S columns of R alike devices, the fastest column
    first; each order of the columns is a stage order. Replica r takes device r of every column
    (aligned: the fastest replica and the slowest), or of every other column device R − 1 − r (snaked:
    a slow device pairs with a fast one, so replicas balance). The boundaries come from `_partition`
    over each position's slowest device, smallest memory and slowest link, so they suit every replica;
    each replica then trains ⌈M / R⌉ micro-batches or fewer.
    """
    spec, blocks = search.spec, search.description.num_blocks
    for replicas in _replica_counts(search):
        share = -(-spec.micro_batches // replicas)
        least = 1 if spec.replicas > 1 else 2  # one-stage replicas are data parallelism, unless asked for
        for stages in range(least, min(len(search.offers) // replicas, blocks) + 1):
            if spec.devices and replicas * stages != spec.devices:
                continue
            for group in _subsets(search, replicas * stages):
                ordered = sorted(group, key=lambda d: (search.speed[d.device_id], d.device_id))
                columns = [ordered[k * replicas:(k + 1) * replicas] for k in range(stages)]
                for order, snake in itertools.product(_stage_orders(columns, exhaustive=bool(search.links)),
                                                      (False, True) if stages > 1 else (False,)):
                    dealt = [column[::-1] if snake and k % 2 else column for k, column in enumerate(order)]
                    chains = [[column[r] for column in dealt] for r in range(replicas)]
                    ranges = _partition(search, _stage_limits(search, chains), share)
                    if ranges is not None:
                        search.consider_pipelines(chains, ranges)


def _check_replicas(spec: JobSpec, description: ModelDescription, offers: Sequence[DeviceOffer]) -> None:
    """Refuse a number of pipeline replicas (``spec.replicas`` > 1) that no set of devices can hold."""
    replicas = spec.replicas
    if replicas <= 1:
        return
    if len(offers) < replicas:
        raise JobError(f"{replicas} pipeline replicas need at least {replicas} devices; only {len(offers)} are alive")
    if spec.devices % replicas:
        raise JobError(f"{replicas} pipeline replicas need a multiple of {replicas} devices; the job asks for "
                       f"{spec.devices}")
    if spec.devices // replicas > description.num_blocks:
        raise JobError(f"{replicas} pipeline replicas over {spec.devices} devices need {spec.devices // replicas} "
                       f"stages each; the model has {description.num_blocks} blocks")


def _describe_speed(search: _Search, device_id: str) -> str:
    fastest = min(search.speed.values())
    return f"it runs a block at {fastest / search.speed[device_id]:.0%} of the fastest device's speed"


def _left_out(search: _Search, best: PlannedJob) -> dict[str, str]:
    """Why each offered device that is not in ``best`` stays out."""
    used = {w.device_id for w in best.plan.workers}
    measure = "J/sample" if search.objective == "energy" else "step time"
    reasons: dict[str, str] = {}
    for offer in search.offers:
        device_id = offer.device_id
        if device_id in used:
            continue
        # Prefer the best plan that adds this device to the chosen ones; else any plan that uses it.
        with_it = [c for c in search.found if used | {device_id} <= {w.device_id for w in c.plan.workers}]
        with_it = with_it or [c for c in search.found if device_id in {w.device_id for w in c.plan.workers}]
        if not with_it:
            reasons[device_id] = (f"left out {device_id}: no plan that includes it fits in its "
                                  f"{_gib(offer.memory_bytes)}" if not search.spec.devices else
                                  f"left out {device_id}: the job asks for {search.spec.devices} device(s)")
            continue
        alternative = min(with_it, key=search.score)
        worse = search.value(alternative) / search.value(best) - 1 if search.value(best) > 0 else 0.0
        if search.objective == "throughput":
            worse = alternative.prediction.step_seconds / best.prediction.step_seconds - 1
        if worse < 0.005:
            why = "it would not make the job faster or thriftier"
        elif search.objective == "energy":
            why = "its idle and busy power would cost more than its help saves"
        elif alternative.prediction.bottleneck == device_id:
            why = f"{_describe_speed(search, device_id)}, which would make its stage the bottleneck"
        else:
            why = "the communication it adds outweighs its compute"
        reasons[device_id] = f"left out {device_id}: {why} (+{worse:.0%} {measure})"
    return reasons


def _reason(search: _Search, best: PlannedJob, left_out: Mapping[str, str]) -> str:
    plan, p = best.plan, best.prediction
    devices = [w.device_id for w in sorted(plan.workers, key=lambda w: (w.dp_index, w.stage, w.tp_index))]
    replicas = len({w.dp_index for w in plan.workers})
    kind = plan.parallelism if replicas == 1 or plan.parallelism != "pipeline" else f"pipeline × {replicas} replicas"
    text = (f"{kind} over {len(devices)} device(s) ({', '.join(devices)}) for {search.objective}: predicted "
            f"{p.step_seconds:.3g} s/step, {p.seconds_per_sample:.3g} s/sample, {p.joules_per_sample:.3g} J/sample "
            f"(model); largest share {_gib(max(p.memory_bytes.values()))}")
    if plan.parallelism == "pipeline":
        text += "; blocks per stage " + "/".join(
            str(w.end_block - w.start_block) for w in sorted(plan.workers, key=lambda w: (w.dp_index, w.stage)))
    if left_out:
        text += "; " + "; ".join(left_out[d] for d in sorted(left_out))
    return text


def _refusal(search: _Search, parallelisms: Sequence[Parallelism]) -> JobError:
    spec, description = search.spec, search.description
    whole = stage_memory(spec, search.costs, blocks=description.num_blocks, first=True, last=True, in_flight=1)
    largest = max(o.memory_bytes for o in search.offers)
    if parallelisms == ["single"]:
        return JobError(f"the model needs {_gib(whole)} to train on one device but the largest device offers "
                        f"{_gib(largest)}; train it with --parallelism pipeline or tensor over several devices")
    if parallelisms == ["data"] and whole > largest:
        return JobError(f"data parallelism keeps the whole model on every device: it needs {_gib(whole)} but the "
                        f"largest device offers {_gib(largest)}; train it with --parallelism pipeline or tensor")
    count = spec.devices or len(search.offers)
    limits = {"pipeline": (description.num_blocks, "blocks"), "tensor": (description.num_heads, "attention heads"),
              "data": (spec.micro_batches, "micro-batches per step")}
    if spec.devices and len(parallelisms) == 1 and parallelisms[0] in limits:
        limit, what = limits[parallelisms[0]]
        if spec.devices > limit:
            return JobError(f"{parallelisms[0]} parallelism over {spec.devices} devices needs at least "
                            f"{spec.devices} {what}; the job has {limit}")
    roomiest = sorted(search.offers, key=lambda o: (-o.memory_bytes, o.device_id))[:min(count, description.num_blocks)]
    plan = even_pipeline_plan(spec, description, roomiest)
    prediction = predict(spec, description, plan, search.offers, costs=search.costs, driver=search.driver)
    device = max(roomiest, key=lambda o: prediction.memory_bytes[o.device_id] / o.memory_bytes)
    return JobError(
        f"no {' or '.join(parallelisms)} plan fits in the devices' memory: even a pipeline over the "
        f"{len(roomiest)} roomiest device(s) would need {_gib(prediction.memory_bytes[device.device_id])} on "
        f"device {device.device_id}, which offers {_gib(device.memory_bytes)} (one device would need "
        f"{_gib(whole)}); add devices or memory"
    )


def plan_with_prediction(spec: JobSpec, description: ModelDescription, offers: Sequence[DeviceOffer], *,
                         objective: Objective = "throughput", profiles: Mapping[str, PowerProfile] | None = None,
                         links: LinkMap | None = None, driver: str | None = None) -> PlannedJob:
    """`plan_job`'s search, returning the chosen plan with its forecast and the reasons for left-out devices."""
    if not offers:
        raise JobError("no device is available to train on")
    if objective not in ("throughput", "energy"):
        raise JobError(f"unknown objective {objective!r}; use throughput or energy")
    if spec.seq_len > description.max_seq_len:
        raise JobError(f"--seq-len {spec.seq_len} is above the model's maximum of {description.max_seq_len}")
    if spec.devices > len(offers):
        raise JobError(f"the job asks for {spec.devices} devices but only {len(offers)} are alive")
    _check_replicas(spec, description, offers)
    search = _Search(spec=spec, description=description, offers=sorted(offers, key=lambda o: o.device_id),
                     objective=objective, profiles=profiles, links=links,
                     costs=measured_costs(spec, description, offers),
                     speed={o.device_id: block_seconds_per_sample(spec, description, o) for o in offers},
                     driver=driver)
    parallelisms: list[Parallelism]
    if spec.replicas > 1:
        parallelisms = ["pipeline"]  # replicas are asked for: only pipeline × data plans
    elif spec.parallelism == "auto":
        parallelisms = ["single"] if spec.devices == 1 else ["single", "data", "tensor", "pipeline"]
    else:
        parallelisms = [spec.parallelism]
    steps = {"single": _search_single, "data": _search_data, "tensor": _search_tensor, "pipeline": _search_pipeline}
    for parallelism in parallelisms:
        if parallelism != "pipeline" or spec.replicas <= 1:
            steps[parallelism](search)
    if "pipeline" in parallelisms:
        _search_hybrid(search)
    if not search.found and spec.replicas > 1:
        raise JobError(f"no plan of {spec.replicas} pipeline replicas fits in the devices' memory; ask for fewer "
                       "replicas (--replicas 0 lets the planner choose)")
    if not search.found:
        raise _refusal(search, parallelisms)
    best = min(search.found, key=search.score)
    left_out = _left_out(search, best)
    p = best.prediction
    plan = replace(best.plan, reason=_reason(search, best, left_out), estimated_memory_bytes=dict(p.memory_bytes),
                   objective=objective, predicted_step_seconds=p.step_seconds,
                   predicted_seconds_per_sample=p.seconds_per_sample,
                   predicted_joules_per_sample=p.joules_per_sample, speed_sources=dict(p.speed_source))
    return PlannedJob(plan=plan, prediction=p, left_out=left_out)


def plan_job(spec: JobSpec, description: ModelDescription, devices: Sequence[DeviceOffer], *,
             objective: Objective = "throughput", profiles: Mapping[str, PowerProfile] | None = None,
             links: LinkMap | None = None, driver: str | None = None) -> JobPlan:
    """Plan ``spec`` on ``devices`` for ``objective``.

    ``spec.parallelism == "auto"`` chooses among one device, data, tensor and pipeline parallelism, and
    pipeline × data (copies of a pipeline that share stage boundaries, each on its share of the
    micro-batches) when ``spec.sync_every`` is 1; ``spec.replicas`` > 1 asks for exactly that many copies,
    1 for none. A fixed parallelism still chooses the devices (``spec.devices`` of them when set) and the
    stage boundaries. ``spec.micro_batches`` is taken as given.

    Args:
        profiles: device ID → power profile (else each offer's named profile, else the default).
        links: (device ID, device ID) → link (either order), else the 1000 Mbps Wi-Fi default.
        driver: the device the job is submitted to: its driver's messages every step cost that device's CPU
            (`cetd.cluster.cost_model.predict`).

    Raises:
        JobError: no devices or too few, a sequence too long for the model, or no plan within every
            device's memory (the message says how much is needed and available).
    """
    return plan_with_prediction(spec, description, devices, objective=objective, profiles=profiles,
                                links=links, driver=driver).plan


def what_if(spec: JobSpec, description: ModelDescription, offers: Sequence[DeviceOffer], *,
            remove: Iterable[str] = (), add: Iterable[DeviceOffer] = (), objective: Objective = "throughput",
            profiles: Mapping[str, PowerProfile] | None = None, links: LinkMap | None = None,
            driver: str | None = None) -> PlannedJob:
    """The plan and forecast if devices ``remove`` left and ``add`` joined (`cetctl plan --what-if`).

    Raises:
        JobError: as `plan_job`, or when ``remove`` names a device that is not offered.
    """
    removed = set(remove)
    unknown = sorted(removed - {o.device_id for o in offers})
    if unknown:
        raise JobError(f"cannot remove {', '.join(unknown)}: not among the available devices")
    remaining = [o for o in offers if o.device_id not in removed]
    added = list(add)
    clash = sorted({o.device_id for o in added} & {o.device_id for o in remaining})
    if clash:
        raise JobError(f"cannot add {', '.join(clash)}: already available")
    return plan_with_prediction(spec, description, [*remaining, *added], objective=objective, profiles=profiles,
                                links=links, driver=driver)
