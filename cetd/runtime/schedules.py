"""Pipeline schedules: the order in which each stage runs the forward and backward of each micro-batch.

A schedule is plain data, one list of `Action`s per stage; the sends and receives are implied by the
stage's position (a forward receives activations from the previous stage and sends to the next, a
backward receives gradients from the next stage and sends to the previous). Both schedules run the
backward passes of every stage in micro-batch order 0..M-1, the order in which single-device gradient
accumulation adds them, so the accumulated gradients match a single device's bit for bit.

`simulate` replays a schedule with given compute times, checking that it cannot deadlock and measuring
its makespan, idle time and peak number of stored activations; the planner uses it to cost a plan.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Action",
    "ActionKind",
    "ScheduleName",
    "ScheduleSimulation",
    "build_schedule",
    "gpipe",
    "one_f_one_b",
    "simulate",
]

ScheduleName = Literal["gpipe", "1f1b"]


class ActionKind(enum.Enum):
    """What a stage does with one micro-batch."""

    FORWARD = "F"
    BACKWARD = "B"


@dataclass(frozen=True, slots=True)
class Action:
    """One step of one stage's schedule."""

    kind: ActionKind
    micro_batch: int

    def __str__(self) -> str:
        return f"{self.kind.value}{self.micro_batch}"


def gpipe(num_stages: int, num_micro_batches: int) -> list[list[Action]]:
    """GPipe: every stage runs all forwards, then all backwards.

    Simple, but every stage keeps the activations of all ``num_micro_batches`` micro-batches.

    Returns:
        One action list per stage.
    """
    _check(num_stages, num_micro_batches)
    forwards = [Action(ActionKind.FORWARD, m) for m in range(num_micro_batches)]
    backwards = [Action(ActionKind.BACKWARD, m) for m in range(num_micro_batches)]
    return [forwards + backwards for _ in range(num_stages)]


def one_f_one_b(num_stages: int, num_micro_batches: int) -> list[list[Action]]:
    """1F1B (PipeDream-flush): a warm-up of forwards, then alternate one forward and one backward.

    Stage ``s`` warms up with ``num_stages - s - 1`` forwards, so it never holds more than
    ``num_stages - s`` micro-batches' activations; the makespan equals GPipe's.

    Returns:
        One action list per stage.
    """
    _check(num_stages, num_micro_batches)
    schedule: list[list[Action]] = []
    for stage in range(num_stages):
        warmup = min(num_stages - stage - 1, num_micro_batches)
        actions = [Action(ActionKind.FORWARD, m) for m in range(warmup)]
        for m in range(num_micro_batches - warmup):
            actions.append(Action(ActionKind.FORWARD, warmup + m))
            actions.append(Action(ActionKind.BACKWARD, m))
        cooldown = range(num_micro_batches - warmup, num_micro_batches)
        actions.extend(Action(ActionKind.BACKWARD, m) for m in cooldown)
        schedule.append(actions)
    return schedule


def build_schedule(name: ScheduleName, num_stages: int, num_micro_batches: int) -> list[list[Action]]:
    """The schedule called ``name`` ("gpipe" or "1f1b")."""
    if name == "gpipe":
        return gpipe(num_stages, num_micro_batches)
    if name == "1f1b":
        return one_f_one_b(num_stages, num_micro_batches)
    raise ValueError(f"unknown pipeline schedule {name!r}; expected 'gpipe' or '1f1b'")


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleSimulation:
    """What replaying a schedule showed."""

    makespan: float
    """Time from the first forward to the last backward, communication taken as free."""
    busy: tuple[float, ...]
    """Compute time of each stage."""
    idle: tuple[float, ...]
    """Time each stage waits inside the makespan (its bubble)."""
    peak_activations: tuple[int, ...]
    """Most micro-batches whose activations each stage held at once (forward done, backward not)."""

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all stage-time: ``(S-1)/(M+S-1)`` for GPipe and 1F1B with uniform stages."""
        total = self.makespan * len(self.busy)
        return sum(self.idle) / total if total else 0.0


def simulate(
    schedule: Sequence[Sequence[Action]],
    *,
    forward_time: Sequence[float] | float = 1.0,
    backward_time: Sequence[float] | float = 2.0,
) -> ScheduleSimulation:
    """Replay ``schedule`` with blocking receives and non-blocking sends, as the runner executes it.

    Args:
        schedule: one action list per stage.
        forward_time: compute time of one forward, per stage or for all stages.
        backward_time: compute time of one backward, per stage or for all stages.

    Raises:
        ValueError: the schedule deadlocks, repeats or misses a micro-batch, or runs a backward
            before its forward.
    """
    stages = len(schedule)
    forward_costs = _per_stage(forward_time, stages)
    backward_costs = _per_stage(backward_time, stages)
    _check_complete(schedule)
    done: dict[tuple[int, ActionKind, int], float] = {}  # (stage, kind, micro-batch) -> finish time
    cursor = [0] * stages
    clock = [0.0] * stages
    in_flight = [0] * stages
    peak = [0] * stages
    while any(cursor[s] < len(schedule[s]) for s in range(stages)):
        progressed = False
        for stage in range(stages):
            while cursor[stage] < len(schedule[stage]):
                action = schedule[stage][cursor[stage]]
                ready = _ready_time(action, stage, stages, done)
                if ready is None:
                    break
                forward = action.kind is ActionKind.FORWARD
                start = max(clock[stage], ready)
                clock[stage] = start + (forward_costs if forward else backward_costs)[stage]
                done[(stage, action.kind, action.micro_batch)] = clock[stage]
                in_flight[stage] += 1 if forward else -1
                peak[stage] = max(peak[stage], in_flight[stage])
                cursor[stage] += 1
                progressed = True
        if not progressed:
            waiting = {s: str(schedule[s][cursor[s]]) for s in range(stages) if cursor[s] < len(schedule[s])}
            raise ValueError(f"schedule deadlocks; stages wait at {waiting}")
    makespan = max(clock)
    busy = tuple(len(schedule[s]) / 2 * (forward_costs[s] + backward_costs[s]) for s in range(stages))
    return ScheduleSimulation(
        makespan=makespan,
        busy=busy,
        idle=tuple(makespan - b for b in busy),
        peak_activations=tuple(peak),
    )


def _ready_time(
    action: Action, stage: int, stages: int, done: dict[tuple[int, ActionKind, int], float]
) -> float | None:
    """When ``action``'s input is available on ``stage``, or None if it is not produced yet."""
    m = action.micro_batch
    if action.kind is ActionKind.FORWARD:
        return 0.0 if stage == 0 else done.get((stage - 1, ActionKind.FORWARD, m))
    own_forward = done.get((stage, ActionKind.FORWARD, m))
    if own_forward is None:
        raise ValueError(f"stage {stage} runs the backward of micro-batch {m} before its forward")
    if stage == stages - 1:
        return own_forward
    return done.get((stage + 1, ActionKind.BACKWARD, m))


def _check_complete(schedule: Sequence[Sequence[Action]]) -> None:
    if not schedule:
        raise ValueError("a schedule needs at least one stage")
    expected = sorted(action.micro_batch for action in schedule[0] if action.kind is ActionKind.FORWARD)
    for stage, actions in enumerate(schedule):
        for kind in ActionKind:
            seen = sorted(action.micro_batch for action in actions if action.kind is kind)
            if seen != list(range(len(expected))):
                raise ValueError(f"stage {stage} runs {kind.name.lower()} of micro-batches {seen}")


def _per_stage(value: Sequence[float] | float, stages: int) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * stages
    if len(value) != stages:
        raise ValueError(f"got {len(value)} per-stage times for {stages} stages")
    return [float(v) for v in value]


def _check(num_stages: int, num_micro_batches: int) -> None:
    if num_stages < 1 or num_micro_batches < 1:
        raise ValueError(
            f"a pipeline needs at least one stage and one micro-batch, not {num_stages} and {num_micro_batches}"
        )
