"""Training jobs in the daemon: submission, launching on the coordinator's plan, worker processes, progress.

Roles per job:
* the *submitting* daemon (where `cetctl train` ran) starts the driver process, which holds the data and
  the model folder and writes the output; it streams progress to `cetctl` and reports to the coordinator;
* the *coordinator* plans the job over the live members and orders each chosen member to start a worker;
* each *member* runs its worker process and connects it to the others when told.
Every order to start or connect a worker carries the coordinator's term and is refused when stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from cetd.cluster.planner import DeviceOffer, plan_job
from cetd.errors import CetdError, JobError, NotAuthorizedError, UnavailableError
from cetd.identity import StateDir, tls_server_name
from cetd.ids import DeviceId
from cetd.runtime.spec import JobPlan, JobSpec, ModelDescription, from_json, to_json
from cetd.transport.job_types import (
    JobEvent,
    JobState,
    JobStatus,
    LaunchResult,
    StepProgress,
    WorkerEndpoint,
    WorkerLaunch,
)
from cetd.transport.jobs_service import JobsClient

from .household import HouseholdNode
from .job_process import JobProcess

logger = logging.getLogger(__name__)

DESCRIBE_TIMEOUT = timedelta(minutes=10)
WORKER_START_TIMEOUT = timedelta(minutes=5)
GENERIC_WATTS_PER_DEVICE = 15.0
"""Energy model until device power profiles are known: a small device at full load (labelled 'model')."""


@dataclass
class JobRecord:
    """A job as one daemon knows it; the submitter's record is the authoritative one."""

    status: JobStatus
    watchers: list[asyncio.Queue[JobEvent]] = field(default_factory=list)
    driver: JobProcess | None = None
    task: asyncio.Task[None] | None = None
    devices: int = 0

    def update(self, step: StepProgress | None = None, **changes: Any) -> None:
        self.status = replace(self.status, **changes)
        event = JobEvent(status=self.status, step=step)
        for queue in self.watchers:
            queue.put_nowait(event)


class JobManager:
    """Implements `JobsHandler` for one daemon."""

    def __init__(self, node: HouseholdNode, state: StateDir, *, host: str, worker_threads: int) -> None:
        self._node = node
        self._state = state
        self._host = host
        self._threads = worker_threads
        self._jobs: dict[str, JobRecord] = {}
        self._workers: dict[str, JobProcess] = {}
        self._worker_owner: dict[str, set[str]] = {}  # job → device IDs allowed to connect its worker
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def _me(self) -> DeviceId:
        return self._node.identity.device_id

    def _client(self, device_id: str) -> JobsClient:
        client = self._node.client_for(DeviceId(device_id))
        return JobsClient(client.channel, client.address)

    def _spawn(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _log_path(self, job_id: str, role: str) -> Any:
        return self._state.path / "jobs" / job_id / f"{role}.log"

    # -- submission (submitting daemon) ---------------------------------------------------------------

    async def submit(self, spec_json: str, caller: DeviceId) -> JobStatus:
        spec = from_json(JobSpec, spec_json)
        job_id = f"job-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        record = JobRecord(status=JobStatus(
            job_id=job_id, state=JobState.DESCRIBING, spec_json=spec_json, submitter_id=self._me,
            steps_total=spec.steps, output=spec.output, created_at=time.time(),
        ))
        self._jobs[job_id] = record
        driver = JobProcess(name="the driver", log_path=self._log_path(job_id, "driver"))
        record.driver = driver
        await driver.start({"role": "driver", "job_id": job_id, "spec": json.loads(spec_json),
                            "state_dir": str(self._state.path), "host": self._host, "threads": self._threads})
        try:
            described = await driver.expect("described", DESCRIBE_TIMEOUT)
        except CetdError as error:
            await driver.stop()
            self._finish(record, JobState.FAILED, str(error))
            raise JobError(f"job {job_id} refused: {error}") from None
        description = json.dumps(described["description"])
        logger.info("job %s described; asking the coordinator to launch it", job_id)
        record.update(state=JobState.LAUNCHING)
        record.task = self._spawn(self._drive(record, spec, description), f"drive-{job_id}")
        return record.status

    async def _drive(self, record: JobRecord, spec: JobSpec, description: str) -> None:
        job_id = record.status.job_id
        driver = record.driver
        assert driver is not None
        try:
            launch = await self._launch_via_coordinator(job_id, record.status.spec_json, description)
            plan = from_json(JobPlan, launch.plan_json)
            record.devices = len(plan.workers)
            record.update(plan_json=launch.plan_json, term=launch.term)
            await driver.send({"plan": json.loads(launch.plan_json)})
            ready = await driver.expect("ready", WORKER_START_TIMEOUT)
            endpoints = (WorkerEndpoint(rank=0, device_id=self._me, address=ready["address"]), *launch.endpoints)
            coordinator = self._node.election.coordinator_id or ""
            await asyncio.gather(*(
                self._connect(e.device_id, launch.term, coordinator, job_id, endpoints) for e in launch.endpoints
            ))
            await driver.send({"peers": _peer_map(endpoints, exclude=0)})
            record.update(state=JobState.RUNNING)
            logger.info("job %s running: %s", job_id, plan.reason)
            await self._follow_driver(record, spec)
        except CetdError as error:
            self._finish(record, JobState.FAILED, str(error))
        except asyncio.CancelledError:
            self._finish(record, JobState.CANCELLED, "cancelled")
            raise
        finally:
            await driver.stop()
            await self._stop_workers(record)
            await self._report(record)

    async def _follow_driver(self, record: JobRecord, spec: JobSpec) -> None:
        driver = record.driver
        assert driver is not None
        total_seconds = 0.0
        total_samples = 0
        last_report = 0.0
        while True:
            event = await driver.next_event()
            kind = event.get("event")
            if kind == "step":
                total_seconds += float(event["seconds"])
                total_samples += int(event["samples"])
                step = StepProgress(step=int(event["step"]), loss=float(event["loss"]),
                                    seconds=float(event["seconds"]), samples=int(event["samples"]))
                per_sample = total_seconds / max(total_samples, 1)
                record.update(step=step, steps_done=step.step, last_loss=step.loss, seconds_per_sample=per_sample,
                              joules_per_sample=per_sample * GENERIC_WATTS_PER_DEVICE * (record.devices + 1),
                              energy_source=f"model: {GENERIC_WATTS_PER_DEVICE:g} W per device")
                if time.monotonic() - last_report > 1.0:
                    last_report = time.monotonic()
                    self._spawn(self._report(record), "report")
            elif kind == "done":
                self._finish(record, JobState.SUCCEEDED, "", output=str(event.get("output", "")))
                return
            elif kind == "failed":
                raise JobError(str(event.get("reason")))

    async def _launch_via_coordinator(self, job_id: str, spec_json: str, description: str) -> LaunchResult:
        coordinator = await self._wait_for_coordinator()
        if coordinator == self._me:
            return await self.launch(job_id, spec_json, description, "", self._me)
        return await self._client(coordinator).launch(job_id, spec_json, description, "")

    async def _wait_for_coordinator(self, timeout: timedelta = timedelta(seconds=15)) -> DeviceId:
        deadline = time.monotonic() + timeout.total_seconds()
        while time.monotonic() < deadline:
            coordinator = self._node.election.coordinator_id
            if coordinator is not None:
                return coordinator
            await asyncio.sleep(0.2)
        raise UnavailableError("the household has no coordinator right now")

    async def _connect(self, device_id: str, term: int, coordinator: str, job_id: str,
                       endpoints: tuple[WorkerEndpoint, ...]) -> None:
        if device_id == self._me:
            await self.connect_worker(term, coordinator, job_id, endpoints, self._me)
        else:
            await self._client(device_id).connect_worker(term, coordinator, job_id, endpoints)

    async def _stop_workers(self, record: JobRecord) -> None:
        if not record.status.plan_json:
            return
        plan = from_json(JobPlan, record.status.plan_json)

        async def stop(device_id: str) -> None:
            try:
                if device_id == self._me:
                    await self.stop_worker(record.status.job_id, self._me)
                else:
                    await self._client(device_id).stop_worker(record.status.job_id)
            except CetdError as error:
                logger.warning("could not stop the worker of %s on %s: %s", record.status.job_id, device_id, error)

        await asyncio.gather(*(stop(w.device_id) for w in plan.workers))

    async def _report(self, record: JobRecord) -> None:
        coordinator = self._node.election.coordinator_id
        if coordinator is None or coordinator == self._me:
            return
        with contextlib.suppress(CetdError):
            await self._client(coordinator).report(record.status)

    def _finish(self, record: JobRecord, state: JobState, reason: str, **changes: Any) -> None:
        if record.status.state.finished:
            return
        if state is JobState.FAILED:
            logger.error("job %s failed: %s", record.status.job_id, reason)
        else:
            logger.info("job %s %s", record.status.job_id, state.value)
        record.update(state=state, reason=reason, finished_at=time.time(), **changes)

    # -- coordinator ----------------------------------------------------------------------------------

    async def launch(self, job_id: str, spec_json: str, description_json: str, driver_address: str,
                     caller: DeviceId) -> LaunchResult:
        if self._node.election.coordinator_id != self._me:
            raise UnavailableError("this device is not the coordinator; ask the current one")
        term = self._node.election.term
        spec = from_json(JobSpec, spec_json)
        description = from_json(ModelDescription, description_json)
        plan = plan_job(spec, description, self._offers())
        plan_json = to_json(plan)
        logger.info("job %s planned (term %d): %s", job_id, term, plan.reason)
        self._jobs.setdefault(job_id, JobRecord(status=JobStatus(
            job_id=job_id, state=JobState.LAUNCHING, spec_json=spec_json, submitter_id=caller,
            steps_total=spec.steps, created_at=time.time())))
        orders = [
            WorkerLaunch(term=term, coordinator_id=self._me, job_id=job_id, rank=w.rank, spec_json=spec_json,
                         plan_json=plan_json, description_json=description_json, submitter_id=caller)
            for w in plan.workers
        ]

        async def start(order: WorkerLaunch, device_id: str) -> WorkerEndpoint:
            if device_id == self._me:
                address = await self.start_worker(order, self._me)
            else:
                address = await self._client(device_id).start_worker(order)
            return WorkerEndpoint(rank=order.rank, device_id=device_id, address=address)

        try:
            endpoints = await asyncio.gather(*(start(o, w.device_id) for o, w in zip(orders, plan.workers,
                                                                                    strict=True)))
        except CetdError:
            for worker in plan.workers:
                with contextlib.suppress(CetdError):
                    if worker.device_id == self._me:
                        await self.stop_worker(job_id, self._me)
                    else:
                        await self._client(worker.device_id).stop_worker(job_id)
            raise
        self._jobs[job_id].update(plan_json=plan_json, term=term, state=JobState.RUNNING)
        return LaunchResult(plan_json=plan_json, endpoints=tuple(endpoints), term=term)

    def _offers(self) -> list[DeviceOffer]:
        now = time.monotonic()
        infos = [self._node.self_info, *self._node.table.alive_info(now).values()]
        return [
            DeviceOffer(device_id=i.device_id, memory_bytes=i.capabilities.memory_bytes, cores=i.capabilities.cores,
                        rank=i.capabilities.rank)
            for i in infos if self._node.roster.roster.is_member(i.device_id)
        ]

    async def report(self, status: JobStatus, caller: DeviceId) -> None:
        if status.submitter_id != caller:
            raise NotAuthorizedError(f"device {caller} reported on a job it did not submit")
        record = self._jobs.get(status.job_id)
        if record is None:
            self._jobs[status.job_id] = JobRecord(status=status)
        else:
            record.status = status

    # -- members: worker processes --------------------------------------------------------------------

    async def start_worker(self, launch: WorkerLaunch, caller: DeviceId) -> str:
        if caller != launch.coordinator_id:
            raise NotAuthorizedError(f"worker order signed by {launch.coordinator_id} but sent by {caller}")
        self._node.election.validate_command(launch.term, DeviceId(launch.coordinator_id))
        key = launch.job_id
        if key in self._workers:
            await self._workers.pop(key).stop()
        process = JobProcess(name=f"worker rank {launch.rank}", log_path=self._log_path(key, f"worker-{launch.rank}"))
        self._workers[key] = process
        self._worker_owner[key] = {launch.coordinator_id, launch.submitter_id}
        await process.start({
            "role": "worker", "job_id": launch.job_id, "rank": launch.rank, "spec": json.loads(launch.spec_json),
            "plan": json.loads(launch.plan_json), "description": json.loads(launch.description_json),
            "state_dir": str(self._state.path), "host": self._host, "threads": self._threads,
        })
        try:
            ready = await process.expect("ready", WORKER_START_TIMEOUT)
        except CetdError:
            await process.stop()
            self._workers.pop(key, None)
            raise
        logger.info("worker rank %d of job %s listening on %s", launch.rank, launch.job_id, ready["address"])
        self._spawn(self._follow_worker(key, process), f"worker-{key}")
        return str(ready["address"])

    async def _follow_worker(self, job_id: str, process: JobProcess) -> None:
        while True:
            event = await process.next_event()
            if event.get("event") == "failed":
                logger.error("worker of job %s failed: %s", job_id, event.get("reason"))
                return
            if event.get("event") == "done":
                logger.info("worker of job %s finished", job_id)
                return

    async def connect_worker(self, term: int, coordinator_id: str, job_id: str,
                             endpoints: tuple[WorkerEndpoint, ...], caller: DeviceId) -> None:
        process = self._workers.get(job_id)
        if process is None:
            raise JobError(f"no worker of job {job_id} runs on this device")
        if caller not in self._worker_owner.get(job_id, set()):
            raise NotAuthorizedError(f"device {caller} may not direct job {job_id}")
        self._node.election.validate_command(term, DeviceId(coordinator_id))
        await process.send({"peers": _peer_map(endpoints, exclude=None)})

    async def stop_worker(self, job_id: str, caller: DeviceId) -> None:
        process = self._workers.pop(job_id, None)
        if process is not None:
            await process.stop()

    # -- queries --------------------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobStatus:
        record = self._jobs.get(job_id)
        if record is not None:
            return record.status
        coordinator = self._node.election.coordinator_id
        if coordinator is not None and coordinator != self._me:
            return await self._client(coordinator).get(job_id)
        raise JobError(f"no job {job_id}")

    async def list_jobs(self) -> list[JobStatus]:
        jobs = {job_id: r.status for job_id, r in self._jobs.items()}
        coordinator = self._node.election.coordinator_id
        if coordinator is not None and coordinator != self._me:
            with contextlib.suppress(CetdError):
                for status in await self._client(coordinator).list_jobs():
                    jobs.setdefault(status.job_id, status)
        return sorted(jobs.values(), key=lambda s: s.created_at)

    async def watch(self, job_id: str) -> AsyncIterator[JobEvent]:
        record = self._jobs.get(job_id)
        if record is None or record.status.submitter_id != self._me:
            status = await self.get(job_id)
            if status.submitter_id and status.submitter_id != self._me:
                async for event in self._client(status.submitter_id).watch(job_id):
                    yield event
                return
            yield JobEvent(status=status)
            return
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        record.watchers.append(queue)
        try:
            yield JobEvent(status=record.status)
            while not record.status.state.finished or not queue.empty():
                event = await queue.get()
                yield event
                if event.status.state.finished:
                    return
        finally:
            record.watchers.remove(queue)

    async def cancel(self, job_id: str) -> JobStatus:
        record = self._jobs.get(job_id)
        if record is not None and record.status.submitter_id == self._me:
            if record.task is not None and not record.task.done():
                record.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await record.task
            self._finish(record, JobState.CANCELLED, "cancelled by the user")
            return record.status
        status = await self.get(job_id)
        if status.state.finished:
            return status
        return await self._client(status.submitter_id).cancel(job_id)

    async def close(self) -> None:
        for record in self._jobs.values():
            if record.task is not None and not record.task.done():
                record.task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *(r.task for r in self._jobs.values() if r.task), return_exceptions=True)
        for process in list(self._workers.values()):
            await process.stop()
        self._workers.clear()


def _peer_map(endpoints: tuple[WorkerEndpoint, ...], exclude: int | None) -> dict[str, list[str]]:
    return {
        str(e.rank): [e.address, tls_server_name(DeviceId(e.device_id))]
        for e in endpoints if e.rank != exclude
    }
