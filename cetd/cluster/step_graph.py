"""One training step as a graph of work on devices and links, replayed to forecast how long it takes.

Every resource (a device's CPU, or one direction of a link) runs its tasks one at a time, in program
order: the order in which the worker's code runs them. A task also waits for the tasks whose output it
needs, plus a delay (a link's latency). A collective (an all-reduce, the loss all-gather) holds all its
members at once: it starts when the last of them is free and its inputs are there.

Replaying the graph gives the step's length without adding serially what overlaps in the real run: one
stage taking in its micro-batches while another computes, the last stage's gradient all-reduce while
the first still runs its backwards, a fast replica's optimizer step while a slow one computes. Walking
back from the last task along whatever held each task up gives the critical path, and with it the
resource that sets the pace.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

__all__ = ["NETWORK", "Replay", "StepGraph"]

NETWORK = "network"
"""The critical-path key for time spent in collectives and in link latencies."""


@dataclass(frozen=True, slots=True)
class _Task:
    resources: tuple[str, ...]
    seconds: float
    after: tuple[tuple[Hashable, float], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Replay:
    """What replaying a step graph showed."""

    makespan: float
    """When the last task finishes (the graph starts at 0)."""
    finish: dict[Hashable, float]
    """Finish time of each task."""
    critical: dict[str, float] = field(default_factory=dict)
    """Seconds each resource spends on the critical path (`NETWORK` for collectives and latencies)."""

    @property
    def bottleneck(self) -> str:
        """The resource with the most time on the critical path ("" for an empty graph)."""
        return max(self.critical, key=lambda r: self.critical[r], default="")


class StepGraph:
    """Tasks on resources, each resource running its tasks in the order they were added."""

    def __init__(self) -> None:
        self._tasks: dict[Hashable, _Task] = {}
        self._programs: dict[str, list[Hashable]] = {}

    def add(self, name: Hashable, resources: str | Sequence[str], seconds: float, *,
            after: Sequence[tuple[Hashable, float]] = ()) -> Hashable:
        """Append a task to the program of each of its ``resources``.

        Args:
            name: unique name of the task.
            resources: one resource, or every member of a collective.
            seconds: how long it holds its resources.
            after: (task, delay) pairs: the task starts no sooner than each one's finish plus the delay
                (a task added later may be named: a stage's backward waits for the next stage's).

        Returns:
            ``name``, to chain calls.

        Raises:
            ValueError: a repeated name, no resource or negative seconds.
        """
        members = (resources,) if isinstance(resources, str) else tuple(dict.fromkeys(resources))
        if name in self._tasks:
            raise ValueError(f"task {name!r} was added twice")
        if not members:
            raise ValueError(f"task {name!r} names no resource")
        if seconds < 0:
            raise ValueError(f"task {name!r} takes {seconds} s")
        self._tasks[name] = _Task(members, float(seconds), tuple((dep, float(delay)) for dep, delay in after))
        for resource in members:
            self._programs.setdefault(resource, []).append(name)
        return name

    def seconds(self, name: Hashable) -> float:
        """How long task ``name`` holds its resources."""
        return self._tasks[name].seconds

    def replay(self, *, end: Hashable | None = None) -> Replay:
        """Run every resource's program as early as its inputs allow.

        Args:
            end: the task whose critical path `Replay.critical` follows back; None: the last to finish.

        Raises:
            ValueError: a task waits for one that was never added, or the programs deadlock (a task
                waits for one behind it, or a collective's members reach it in different orders).
        """
        for name, task in self._tasks.items():
            unknown = [dep for dep, _ in task.after if dep not in self._tasks]
            if unknown:
                raise ValueError(f"task {name!r} waits for unknown task(s) {unknown!r}")
        cursor = dict.fromkeys(self._programs, 0)
        free = dict.fromkeys(self._programs, 0.0)
        last: dict[str, Hashable | None] = dict.fromkeys(self._programs)
        finish: dict[Hashable, float] = {}
        held_by: dict[Hashable, tuple[Hashable | None, float]] = {}  # task -> (what it waited for, latency)
        waiters: dict[Hashable, list[str]] = {}  # task -> resources whose next task waits for it to finish
        pending = deque(self._programs)  # resources whose next task may have become ready
        while pending:
            resource = pending.popleft()
            program = self._programs[resource]
            while cursor[resource] < len(program):
                name = program[cursor[resource]]
                task = self._tasks[name]
                if any(self._programs[m][cursor[m]] != name for m in task.resources):
                    break  # a member gets to it later; it comes back here then
                missing = next((dep for dep, _ in task.after if dep not in finish), None)
                if missing is not None:
                    waiters.setdefault(missing, []).append(resource)
                    break
                start, cause, delay = 0.0, None, 0.0
                for member in task.resources:
                    if free[member] > start:
                        start, cause, delay = free[member], last[member], 0.0
                for dep, lag in task.after:
                    if finish[dep] + lag > start:
                        start, cause, delay = finish[dep] + lag, dep, lag
                finish[name] = start + task.seconds
                held_by[name] = (cause, delay)
                for member in task.resources:
                    free[member], last[member] = finish[name], name
                    cursor[member] += 1
                    if member != resource:
                        pending.append(member)
                pending.extend(waiters.pop(name, ()))
        if len(finish) < len(self._tasks):
            waiting = {r: p[cursor[r]] for r, p in self._programs.items() if cursor[r] < len(p)}
            raise ValueError(f"the step graph deadlocks; resources wait at {waiting!r}")
        if end is not None and end not in finish:
            raise ValueError(f"task {end!r} was never added")
        return Replay(makespan=max(finish.values(), default=0.0), finish=finish,
                      critical=self._critical_path(finish, held_by, end))

    def _critical_path(self, finish: dict[Hashable, float], held_by: dict[Hashable, tuple[Hashable | None, float]],
                       end: Hashable | None) -> dict[str, float]:
        critical: dict[str, float] = {}
        name: Hashable | None = end if end is not None else max(finish, key=lambda n: finish[n], default=None)
        while name is not None:
            task = self._tasks[name]
            key = task.resources[0] if len(task.resources) == 1 else NETWORK
            critical[key] = critical.get(key, 0.0) + task.seconds
            name, delay = held_by[name]
            if delay:
                critical[NETWORK] = critical.get(NETWORK, 0.0) + delay
        return critical
