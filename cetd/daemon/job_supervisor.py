"""The submitting daemon's supervision of one job: incarnations, failures, drains, pauses, restarts.

An *incarnation* is one plan being executed: the coordinator plans over the devices alive now, workers
start, the driver sends them their shares (from the newest complete checkpoint when resuming) and
trains. When a device of the plan dies (its stream ends, or its heartbeats stop: the supervisor then
aborts the step), the driver reports `lost`; when a device leaves on purpose the driver checkpoints at
the next step boundary and stops (`migrate`). Either way the next incarnation resumes from the newest
complete checkpoint on whatever devices remain — so a failure costs at most the steps since that
checkpoint, and the partition may differ. A checkpoint that cannot be written pauses the job and is
retried; nothing is ever marked complete before all of it is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from cetd.cluster.membership import PeerState
from cetd.cluster.power import DeviceUsage
from cetd.errors import CetdError, JobError, UnavailableError
from cetd.runtime.spec import JobPlan, JobSpec, from_json
from cetd.transport.job_types import JobEvent, JobState, JobStatus, StepProgress, WorkerEndpoint, WorkerUsage

from .job_process import JobProcess
from .job_store import CheckpointRecord, Recovery, StoredJob
from .planning_inputs import peer_map

if TYPE_CHECKING:
    from .jobs import JobManager

logger = logging.getLogger(__name__)

READY_TIMEOUT = timedelta(minutes=5)
PAUSE_RETRY = timedelta(seconds=3)
"""Wait before planning again while the devices a job needs are missing (a failed plan costs little)."""
PAUSE_RETRY_MAX = timedelta(seconds=60)
"""Longest wait before relaunching a job whose checkpoints keep failing (`pause_delay`)."""
MAX_RECOVERIES = 50


def pause_delay(pauses: int) -> float:
    """Seconds to wait before relaunching a job after its ``pauses``-th failed checkpoint in a row.

    Each relaunch plans, starts a worker and loads the model on every device of the plan, and trains up to
    the next checkpoint: on a disk that stays full that was a relaunch every ~20 s on every device, for as
    long as nobody made room. So the wait doubles from `PAUSE_RETRY` with every failure in a row, up to
    `PAUSE_RETRY_MAX`; a checkpoint that completes starts the count again.
    """
    doublings = min(max(pauses - 1, 0), 8)
    return float(min(PAUSE_RETRY.total_seconds() * 2**doublings, PAUSE_RETRY_MAX.total_seconds()))


@dataclass
class JobRecord:
    """A job as one daemon knows it; the submitter's record is the authoritative one."""

    status: JobStatus
    watchers: list[asyncio.Queue[JobEvent]] = field(default_factory=list)
    driver: JobProcess | None = None
    task: asyncio.Task[None] | None = None
    supervisor: JobSupervisor | None = None
    devices: int = 0

    def update(self, step: StepProgress | None = None, **changes: Any) -> None:
        self.status = replace(self.status, **changes)
        event = JobEvent(status=self.status, step=step)
        for queue in self.watchers:
            queue.put_nowait(event)


@dataclass
class DeviceUsageTotal:
    cpu_seconds: float = 0.0
    """While training (`WorkerUsage.cpu_seconds`)."""
    startup_cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    joules: float = 0.0
    source: str = ""


@dataclass
class Incarnation:
    plan: JobPlan
    term: int
    started: float
    devices: set[str] = field(default_factory=set)
    aborted: bool = False


class JobSupervisor:
    """Runs one job from its submitting daemon until it succeeds, fails for good or is cancelled."""

    def __init__(self, manager: JobManager, record: JobRecord, stored: StoredJob, driver: JobProcess,
                 description_json: str) -> None:
        self._manager = manager
        self._record = record
        self._stored = stored
        self._driver = driver
        self._description = description_json
        self._spec = from_json(JobSpec, stored.spec_json)
        self._current: Incarnation | None = None
        self._leaving: set[str] = set()
        self._fatal = ""
        """Set when a worker reported a failure that re-planning cannot help."""
        self._crashed = ""
        """The device whose worker reported failing on its own (not because a peer's stream ended)."""
        self._requested_workers = 0
        self._seconds = 0.0
        self._samples = 0
        self._usage: dict[str, DeviceUsageTotal] = {}
        """Per device: CPU-seconds, wall seconds and metered joules of the job's processes there."""
        self._paused_for = ""
        """The reason of the pause last logged, until a step runs again."""
        self._failed_checkpoints = 0
        """Pauses for a checkpoint that could not be written, in a row (`pause_delay`)."""

    @property
    def job_id(self) -> str:
        return self._stored.job_id

    @property
    def devices(self) -> set[str]:
        return set() if self._current is None else set(self._current.devices)

    # -- the incarnation loop -------------------------------------------------------------------------

    async def run(self) -> None:
        resume = bool(self._stored.checkpoints)
        exclude: set[str] = set()
        pending: Recovery | None = None
        noticed = 0.0
        watcher = asyncio.get_running_loop().create_task(self._watch_members(), name=f"watch-{self.job_id}")
        try:
            while True:
                # A recovery is timed from when the loss was noticed, stopping old workers included.
                plan_started = noticed if pending is not None else time.monotonic()
                try:
                    launch = await self._manager.launch_via_coordinator(
                        self.job_id, self._stored.spec_json, self._description, exclude | self._leaving,
                        resume=resume or pending is not None)
                except (UnavailableError, JobError) as error:
                    if not resume and pending is None:
                        raise
                    self._set_state(JobState.PAUSED, f"waiting for devices: {error}",
                                    retry=f"retrying every {PAUSE_RETRY.total_seconds():g} s")
                    await asyncio.sleep(PAUSE_RETRY.total_seconds())
                    exclude = set()
                    continue
                plan = from_json(JobPlan, launch.plan_json)
                self._requested_workers = self._requested_workers or len(plan.workers)
                self._crashed = ""
                self._current = Incarnation(plan=plan, term=launch.term, started=time.monotonic(),
                                            devices={w.device_id for w in plan.workers})
                self._record.devices = len(plan.workers)
                self._record.update(plan_json=launch.plan_json, term=launch.term)
                await self._driver.send({"plan": json.loads(launch.plan_json), "term": launch.term,
                                         "resume": resume})
                ready = await self._driver.expect("ready", READY_TIMEOUT)
                planned = time.monotonic()  # workers are running and the driver is listening
                endpoints = (WorkerEndpoint(rank=0, device_id=self._manager.me, address=ready["address"]),
                             *launch.endpoints)
                coordinator = self._manager.coordinator_id() or ""
                await asyncio.gather(*(self._manager.connect(e.device_id, launch.term, coordinator, self.job_id,
                                                             endpoints) for e in launch.endpoints))
                await self._driver.send({"peers": peer_map(endpoints)})
                self._set_state(JobState.RUNNING, "")
                logger.info("job %s running (term %d): %s", self.job_id, launch.term, plan.reason)
                outcome, event = await self._follow(pending, plan_started, planned)
                noticed_at, noticed = time.time(), time.monotonic()  # when the driver reported how it ended
                pending = None
                if outcome == "done":
                    self._account(await self._manager.stop_workers(plan), plan, final=True)
                    self._manager.finish(self._record, JobState.SUCCEEDED, "", output=str(event.get("output", "")))
                    self._save()
                    return
                usage = await self._manager.stop_workers(plan)
                self._account(usage, plan, final=False)
                fatal = [self._fatal] if self._fatal else [u.failure for u in usage.values() if u.fatal]
                if fatal:
                    raise JobError(fatal[0])
                resume = bool(self._stored.checkpoints)
                if outcome == "paused":
                    self._failed_checkpoints += 1
                    delay = pause_delay(self._failed_checkpoints)
                    self._set_state(JobState.PAUSED, str(event.get("reason")),
                                    retry=f"retrying in {delay:g} s, then less often while it lasts "
                                          f"(at most every {PAUSE_RETRY_MAX.total_seconds():g} s)")
                    await asyncio.sleep(delay)
                    exclude = set()
                    continue
                # lost: a device failed or is leaving; the next incarnation resumes without it.
                if len(self._stored.recoveries) >= MAX_RECOVERIES:
                    raise JobError(f"gave up after {MAX_RECOVERIES} recoveries; last: {event.get('reason')}")
                failed_device = "" if event.get("migrated") else await self._blame(plan, event)
                exclude = {failed_device} if failed_device and not event.get("migrated") else set()
                checkpoint = int(event.get("checkpoint_step") or 0)
                failed_step = int(event.get("last_step") or 0) + 1
                pending = Recovery(
                    at=noticed_at, cause=str(event.get("reason")), device_id=failed_device,
                    failed_step=failed_step, resumed_from=checkpoint,
                    steps_redone=max(0, int(event.get("last_step") or 0) - checkpoint),
                )
                logger.warning("job %s lost a device at step %d (%s); resuming from checkpoint %d",
                               self.job_id, failed_step, event.get("reason"), checkpoint)
                self._set_state(JobState.RECOVERING, str(event.get("reason")))
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _follow(self, pending: Recovery | None, plan_started: float,
                      planned: float) -> tuple[str, dict[str, Any]]:
        """Follow the driver through one incarnation; return how it ended."""
        first_step = True
        while True:
            event = await self._driver.next_event()
            kind = event.get("event")
            if kind == "step":
                self._on_step(event)
                if first_step and pending is not None:
                    now = time.monotonic()
                    warmup = float(event["seconds"])
                    self._stored.recoveries.append(Recovery(
                        at=pending.at, cause=pending.cause, device_id=pending.device_id,
                        failed_step=pending.failed_step, resumed_from=pending.resumed_from,
                        steps_redone=pending.steps_redone, replan_s=planned - plan_started,
                        reload_s=max(0.0, now - warmup - planned), warmup_s=warmup, recovered_s=now - plan_started,
                    ))
                    self._save()
                first_step = False
            elif kind == "checkpoint":
                self._stored.checkpoints.append(CheckpointRecord(
                    step=int(event["step"]), at=time.time(), manifest=str(event["manifest"]),
                    term=self._current.term if self._current else 0))
                self._stored.checkpoints = self._stored.checkpoints[-10:]
                self._failed_checkpoints = 0
                self._save()
                self._maybe_grow()
            elif kind in ("done", "lost", "paused"):
                return str(kind), event
            elif kind == "failed":
                raise JobError(str(event.get("reason")))

    def _on_step(self, event: dict[str, Any]) -> None:
        step = StepProgress(step=int(event["step"]), loss=float(event["loss"]), seconds=float(event["seconds"]),
                            samples=int(event["samples"]))
        if self._paused_for:
            logger.info("job %s goes on at step %d after a pause (%s)", self.job_id, step.step, self._paused_for)
            self._paused_for = ""
        self._seconds += step.seconds
        self._samples += step.samples
        self._stored.steps_done = step.step
        self._record.update(step=step, steps_done=step.step, last_loss=step.loss,
                            seconds_per_sample=self._seconds / max(self._samples, 1), **self._energy(live=True))
        self._manager.report_soon(self._record)

    def _account(self, usage: dict[str, WorkerUsage], plan: JobPlan, *, final: bool) -> None:
        """Add what one incarnation's processes used, per device (the driver counts on this device)."""
        for device_id, used in usage.items():
            total = self._usage.setdefault(device_id, DeviceUsageTotal())
            total.cpu_seconds += used.cpu_seconds
            total.startup_cpu_seconds += used.startup_cpu_seconds
            total.wall_seconds += used.wall_seconds
            total.joules += used.joules
            total.source = used.energy_source or total.source
        mine = self._usage.setdefault(self._manager.me, DeviceUsageTotal())
        mine.cpu_seconds = max(mine.cpu_seconds, 0.0) + self._driver.take_cpu_seconds()
        mine.wall_seconds = max(mine.wall_seconds, self._driver.wall_seconds())
        if final:
            self._record.update(**self._energy(live=False))

    def _energy(self, *, live: bool) -> dict[str, Any]:
        """Joules per sample per device and in total: meters where devices have them, else the power model.

        While the job runs, devices are assumed busy on their worker threads (a live estimate); at the
        end the measured CPU time of every job process while it trained is used, like the seconds per
        sample (the sum of the steps' times). What each process used to start (imports, loading the
        model and data, building and taking its share) is reported apart, per device, as
        ``startup_joules`` (the power model's busy watts over that CPU time): in a 20-step gpt2-tiny job
        each device's processes took 3.5–3.7 CPU-seconds to start, more energy than all its training,
        and a short job's J/sample would compare start-ups, not plans.
        """
        plan = self._current.plan if self._current else None
        if plan is None or not self._samples:
            return {}
        devices = {w.device_id for w in plan.workers} | {self._manager.me} | set(self._usage)
        model = self._manager.energy_model(devices)
        report: dict[str, dict[str, Any]] = {}
        sources: set[str] = set()
        wall = self._seconds
        for device_id in sorted(devices):
            total = self._usage.get(device_id)
            if total is not None and total.joules > 0 and not live:
                joules, source = total.joules, total.source
            else:
                cpu = (min(self._manager.worker_threads, 1 << 10) * wall if live or total is None
                       else total.cpu_seconds)
                # Idle power counts for the training time; CPU time is all the job's processes used there.
                estimate = model.device_joules(DeviceUsage(
                    device_id=device_id, wall=timedelta(seconds=wall), cpu_time=timedelta(seconds=cpu)))
                joules, source = estimate.joules, f"model:{model.profile(device_id).name}"
            sources.add(source.split(":")[0])
            startup = total.startup_cpu_seconds if total is not None else 0.0
            if device_id == self._manager.me:  # the driver starts once, whatever its incarnations
                startup += self._driver.startup_cpu_seconds
            startup_joules = model.device_joules(DeviceUsage(
                device_id=device_id, wall=timedelta(0), cpu_time=timedelta(seconds=startup))).joules
            report[device_id] = {"joules": joules, "joules_per_sample": joules / self._samples, "source": source,
                                 "startup_cpu_seconds": startup, "startup_joules": startup_joules}
        total_joules = sum(r["joules"] for r in report.values())
        label = " + ".join(sorted(sources)) + (" (live estimate: CPUs assumed busy)" if live
                                               else " (measured CPU time)" if "model" in sources else "")
        return {"joules_per_sample": total_joules / self._samples, "energy_source": label,
                "energy_json": json.dumps(report)}

    # -- reacting to the household --------------------------------------------------------------------

    async def _watch_members(self) -> None:
        """Abort the running step as soon as a device of the plan is declared dead by heartbeats."""
        while True:
            await asyncio.sleep(0.25)
            current = self._current
            if current is None or current.aborted:
                continue
            dead = [d for d in current.devices if self._manager.peer_state(d) is PeerState.DEAD]
            if dead:
                current.aborted = True
                reason = f"device {dead[0]} stopped answering heartbeats"
                logger.warning("job %s: %s; aborting the step", self.job_id, reason)
                with contextlib.suppress(CetdError, ConnectionError):
                    await self._driver.send({"abort": reason})

    async def worker_failed(self, device_id: str, reason: str, fatal: bool) -> None:
        """A worker process of the current plan failed on its device: abort the step now."""
        current = self._current
        if current is None or device_id not in current.devices:
            return
        if fatal:
            self._fatal = reason
        elif "ended its stream" not in reason and "could not reach peer" not in reason and not self._crashed:
            self._crashed = device_id
        if not current.aborted:
            current.aborted = True
            logger.warning("job %s: the worker on %s failed (%s); aborting the step", self.job_id, device_id, reason)
            with contextlib.suppress(CetdError, ConnectionError):
                await self._driver.send({"abort": f"the worker on device {device_id} failed: {reason}"})

    async def leave(self, device_id: str) -> bool:
        """Move the job off ``device_id`` (drain, shutdown): checkpoint at the next step and re-plan."""
        self._leaving.add(device_id)
        current = self._current
        if current is None or device_id not in current.devices:
            return False
        logger.info("job %s leaves device %s at the next step boundary", self.job_id, device_id)
        await self._driver.send({"migrate": True})
        return True

    def _maybe_grow(self) -> None:
        """At a checkpoint boundary, take in devices that arrived if the job runs on fewer than it asked."""
        current = self._current
        if current is None or len(current.plan.workers) >= self._requested_workers:
            return
        candidates = self._manager.live_devices() - current.devices - self._leaving
        if candidates:
            logger.info("job %s: %d device(s) available again; re-planning at this checkpoint",
                        self.job_id, len(candidates))
            self._manager.spawn(self._driver.send({"migrate": True}), "grow")

    async def _blame(self, plan: JobPlan, event: dict[str, Any], settle: timedelta = timedelta(seconds=2)) -> str:
        """Which device failed. A neighbour of a dead device fails too (its stream ended), so the first
        failure report is a poor witness: heartbeats are asked first, given a moment to notice (a killed
        device turns suspect within 1.5 s); then a worker that crashed on its own; then the rank the driver
        was waiting on."""
        devices = {w.device_id for w in plan.workers}
        deadline = time.monotonic() + settle.total_seconds()
        while True:
            silent = sorted(d for d in devices if self._manager.peer_state(d) is not PeerState.ALIVE)
            if silent:
                return silent[0]
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        if self._crashed:
            return self._crashed
        rank = event.get("failed_rank")
        if isinstance(rank, int) and rank > 0:
            with contextlib.suppress(KeyError):
                return plan.worker(rank).device_id
        return ""

    def _set_state(self, state: JobState, reason: str, *, retry: str = "") -> None:
        """``retry``: for a pause, when the job is tried again (the journal says it beside the reason)."""
        if state is JobState.PAUSED and reason != self._paused_for:
            # Once per cause: the job retries every few seconds, and the journal must say why it waits.
            logger.warning("job %s paused: %s; %s", self.job_id, reason, retry)
            self._paused_for = reason
        self._stored.state = state.value
        self._stored.reason = reason
        self._record.update(state=state, reason=reason)
        self._save()
        self._manager.report_soon(self._record)

    def _save(self) -> None:
        self._record.update(checkpoints=tuple(c.step for c in self._stored.checkpoints),
                            recoveries_json=json.dumps([asdict(r) for r in self._stored.recoveries]))
        self._manager.store.save(self._stored)
