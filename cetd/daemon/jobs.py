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
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from cetd.cluster.membership import PeerState
from cetd.cluster.planner import DeviceOffer, plan_job, what_if
from cetd.cluster.power import EnergyModel
from cetd.errors import CetdError, JobError, NotAuthorizedError, StaleTermError, UnavailableError
from cetd.identity import StateDir, short_id, tls_server_name
from cetd.ids import DeviceId
from cetd.runtime.spec import JobPlan, JobSpec, ModelDescription, WorkerAssignment, from_json, to_json
from cetd.transport.job_types import (
    JobEvent,
    JobState,
    JobStatus,
    LaunchResult,
    PlanAnswer,
    ProfileAnswer,
    ProfileQuery,
    WorkerEndpoint,
    WorkerLaunch,
    WorkerUsage,
)
from cetd.transport.jobs_service import JobsClient
from cetd.transport.peer_info import Capabilities

from .household import HouseholdNode
from .job_process import JobProcess
from .job_store import JobStore, StoredJob
from .job_supervisor import JobRecord, JobSupervisor
from .local_workers import LocalWorkers
from .planning_inputs import energy_model, member_offers, peer_map, planning_inputs
from .shape_profiles import EchoFound, ShapeProfiles, echo_order

logger = logging.getLogger(__name__)

DESCRIBE_TIMEOUT = timedelta(minutes=10)
ECHO_ASK_TIMEOUT = timedelta(minutes=4)
"""Longest a device waits for another to start an echo of its transport profile (a fresh process imports torch)."""
LAUNCH_TERMS = 3
"""Coordinators a job's launch is asked of, one after another, when the household elects a new one meanwhile."""


class JobManager:
    """Implements `JobsHandler` for one daemon."""

    def __init__(self, node: HouseholdNode, state: StateDir, *, host: str, worker_threads: int,
                 checkpoint_dir: Path, profile: bool = True) -> None:
        self._node = node
        self._state = state
        self._host = host
        self._threads = worker_threads
        self._checkpoint_dir = checkpoint_dir
        self.store = JobStore(state)
        self._draining: set[str] = set()
        self._jobs: dict[str, JobRecord] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.workers = LocalWorkers(self._launch_fields, self._log_path, self._tell_submitter_worker_failed,
                                    self._spawn)
        node.busy = lambda: bool(self.workers) or any(r.driver is not None and r.driver.running
                                                      for r in self._jobs.values())
        self.shapes = ShapeProfiles(state.path, self.worker_threads, enabled=profile, me=self.me,
                                    remote=lambda device_id: self._client(device_id).profile,
                                    busy=lambda: bool(self.workers),  # a job trains here
                                    host=host, find_echo=self._find_echo)
        node.measuring = self.shapes.measuring

    @property
    def me(self) -> DeviceId:
        return self._node.identity.device_id

    def coordinator_id(self) -> DeviceId | None:
        return self._node.election.coordinator_id

    def peer_state(self, device_id: str) -> PeerState | None:
        if device_id == self.me:
            return PeerState.ALIVE
        return self._node.table.state(DeviceId(device_id), time.monotonic())

    def live_devices(self) -> set[str]:
        return {o.device_id for o in member_offers(self._node)}

    def _capabilities(self) -> dict[str, Capabilities]:
        """Device ID → its advertised `Capabilities`, for every live device."""
        infos = [self._node.self_info, *self._node.table.alive_info(time.monotonic()).values()]
        return {str(info.device_id): info.capabilities for info in infos}

    def spawn(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        return self._spawn(coroutine, name)

    @property
    def worker_threads(self) -> int:
        return self._threads or (os.cpu_count() or 1)

    def energy_model(self, devices: set[str]) -> EnergyModel:
        return energy_model(self._node, devices)

    def report_soon(self, record: JobRecord) -> None:
        """Tell the coordinator about a job's progress, at most once a second."""
        now = time.monotonic()
        if now - getattr(record, "_reported", 0.0) > 1.0 or record.status.state.finished:
            record._reported = now  # type: ignore[attr-defined]  # throttle stamp
            self._spawn(self._report(record), "report")

    def _client(self, device_id: str) -> JobsClient:
        client = self._node.client_for(DeviceId(device_id))
        return JobsClient(client.channel, client.address)

    def _spawn(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _log_path(self, job_id: str, role: str) -> Path:
        return self._state.path / "jobs" / job_id / f"{role}.log"

    def _launch_fields(self) -> dict[str, Any]:
        """What every job process of this daemon (driver or worker) is started with."""
        return {"state_dir": str(self._state.path), "host": self._host, "threads": self._threads,
                "checkpoint_dir": str(self._checkpoint_dir), "device_id": self.me}

    # -- submission (submitting daemon) ---------------------------------------------------------------

    async def submit(self, spec_json: str, caller: DeviceId) -> JobStatus:
        spec = from_json(JobSpec, spec_json)
        job_id = f"job-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        stored = StoredJob(job_id=job_id, spec_json=spec_json, state=JobState.DESCRIBING.value,
                           created_at=time.time())
        record = self._new_record(stored, spec)
        description = await self._describe(record, stored)
        record.task = self._spawn(self._supervise(record, stored, description), f"job-{job_id}")
        return record.status

    def _new_record(self, stored: StoredJob, spec: JobSpec) -> JobRecord:
        record = JobRecord(status=JobStatus(
            job_id=stored.job_id, state=JobState(stored.state), spec_json=stored.spec_json, submitter_id=self.me,
            steps_total=spec.steps, steps_done=stored.steps_done, output=spec.output, created_at=stored.created_at,
            checkpoints=tuple(c.step for c in stored.checkpoints),
        ))
        self._jobs[stored.job_id] = record
        return record

    async def _start_driver(self, name: str, job_id: str, spec_json: str, log_path: Path) -> JobProcess:
        driver = JobProcess(name=name, log_path=log_path)
        await driver.start({**self._launch_fields(), "role": "driver", "job_id": job_id,
                            "spec": json.loads(spec_json)})
        return driver

    async def _describe(self, record: JobRecord, stored: StoredJob) -> str:
        """Start the driver and let it check model and data; refuse the job with its reason."""
        self.store.save(stored)
        driver = await self._start_driver("the driver", stored.job_id, stored.spec_json,
                                          self._log_path(stored.job_id, "driver"))
        record.driver = driver
        try:
            described = await driver.expect("described", DESCRIBE_TIMEOUT)
        except CetdError as error:
            await driver.stop()
            self.finish(record, JobState.FAILED, str(error))
            stored.state, stored.reason = JobState.FAILED.value, str(error)
            self.store.save(stored)
            raise JobError(f"job {stored.job_id} refused: {error}") from None
        driver.mark_training(float(described.get("cpu_seconds", 0.0)))  # loading model and data was its start-up
        logger.info("job %s described; asking the coordinator to launch it", stored.job_id)
        record.update(state=JobState.LAUNCHING)
        return json.dumps(described["description"])

    async def _supervise(self, record: JobRecord, stored: StoredJob, description: str) -> None:
        driver = record.driver
        assert driver is not None
        supervisor = JobSupervisor(self, record, stored, driver, description)
        record.supervisor = supervisor
        try:
            await supervisor.run()
        except CetdError as error:
            self.finish(record, JobState.FAILED, str(error))
        except asyncio.CancelledError:
            self.finish(record, JobState.CANCELLED, "cancelled")
            raise
        finally:
            stored.state, stored.reason = record.status.state.value, record.status.reason
            stored.finished_at = record.status.finished_at
            if record.status.state.finished:
                self.store.save(stored)
            await driver.stop()
            if record.status.plan_json:
                await self.stop_workers(from_json(JobPlan, record.status.plan_json))
            await self._report(record)

    async def resume_unfinished(self) -> None:
        """After a restart (power cut, upgrade): resume every job this device submitted and did not finish."""
        for stored in self.store.load_all():
            if JobState(stored.state).finished or stored.job_id in self._jobs:
                continue
            logger.info("resuming job %s after a restart (newest checkpoint: step %s)", stored.job_id,
                        stored.checkpoints[-1].step if stored.checkpoints else "none")
            record = self._new_record(stored, from_json(JobSpec, stored.spec_json))
            record.task = self._spawn(self._resume(record, stored), f"job-{stored.job_id}")

    async def _resume(self, record: JobRecord, stored: StoredJob) -> None:
        try:
            description = await self._describe(record, stored)
        except CetdError:
            return
        await self._supervise(record, stored, description)

    async def launch_via_coordinator(self, job_id: str, spec_json: str, description: str,
                                     exclude: set[str], resume: bool) -> LaunchResult:
        """Have the coordinator plan and start the job; when the household elects another coordinator while
        it does (a device refuses the old one's stale term), ask the new one, up to `LAUNCH_TERMS` times.

        Raises:
            UnavailableError: no coordinator, or the coordinator kept changing.
            JobError: no plan fits.
        """
        excluded = tuple(sorted(exclude))
        term = None
        for attempt in range(1, LAUNCH_TERMS + 1):
            coordinator = await self._wait_for_coordinator(newer_than=term)
            term = self._node.election.term
            try:
                if coordinator == self.me:
                    return await self.launch(job_id, spec_json, description, excluded, resume, self.me)
                return await self._client(coordinator).launch(job_id, spec_json, description, excluded, resume)
            except StaleTermError as error:
                if attempt == LAUNCH_TERMS:
                    raise UnavailableError(f"the household changed coordinator {attempt} times while the job "
                                           f"started; last: {error}") from error
                logger.warning("job %s: %s; starting it again through the new coordinator", job_id, error)
        raise AssertionError("unreachable")

    async def _wait_for_coordinator(self, newer_than: int | None = None,
                                    timeout: timedelta = timedelta(seconds=15)) -> DeviceId:
        """The coordinator this device follows, once it follows one (elected after term ``newer_than``, when
        given: its heartbeats bring the claim). After ``timeout``, whoever it follows, else UnavailableError."""
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            coordinator, late = self._node.election.coordinator_id, time.monotonic() >= deadline
            if coordinator is not None and (late or newer_than is None or self._node.election.term > newer_than):
                return coordinator
            if late:
                raise UnavailableError("the household has no coordinator right now")
            await asyncio.sleep(0.2)

    async def connect(self, device_id: str, term: int, coordinator: str, job_id: str,
                       endpoints: tuple[WorkerEndpoint, ...]) -> None:
        if device_id == self.me:
            await self.connect_worker(term, coordinator, job_id, endpoints, self.me)
        else:
            await self._client(device_id).connect_worker(term, coordinator, job_id, endpoints)

    async def stop_workers(self, plan: JobPlan, job_id: str | None = None) -> dict[str, WorkerUsage]:
        """Stop the workers of one incarnation (best effort: a dead device's worker is gone anyway);
        return what each reachable device's worker used."""
        job = job_id or next((j for j, r in self._jobs.items() if r.status.plan_json and
                              from_json(JobPlan, r.status.plan_json) == plan), "")

        usage: dict[str, WorkerUsage] = {}

        async def stop(device_id: str) -> None:
            try:
                if device_id == self.me:
                    usage[device_id] = await self.stop_worker(job, self.me)
                elif self.peer_state(device_id) is not PeerState.DEAD:
                    usage[device_id] = await self._client(device_id).stop_worker(job, timeout=timedelta(seconds=5))
            except CetdError as error:
                logger.warning("could not stop the worker of %s on %s: %s", job, device_id, error)

        await asyncio.gather(*(stop(w.device_id) for w in plan.workers))
        return usage

    async def _report(self, record: JobRecord) -> None:
        coordinator = self._node.election.coordinator_id
        if coordinator is None or coordinator == self.me:
            return
        with contextlib.suppress(CetdError):
            await self._client(coordinator).report(record.status)

    def finish(self, record: JobRecord, state: JobState, reason: str, **changes: Any) -> None:
        if record.status.state.finished:
            return
        if state is JobState.FAILED:
            logger.error("job %s failed: %s", record.status.job_id, reason)
        else:
            logger.info("job %s %s", record.status.job_id, state.value)
        record.update(state=state, reason=reason, finished_at=time.time(), **changes)

    # -- coordinator ----------------------------------------------------------------------------------

    async def launch(self, job_id: str, spec_json: str, description_json: str, exclude: tuple[str, ...],
                     resume: bool, caller: DeviceId) -> LaunchResult:
        """Plan the job on the live members and start its workers; a device that cannot start its worker
        (it died since its last heartbeat) is left out and the job re-planned, up to three times."""
        if self._node.election.coordinator_id != self.me:
            raise StaleTermError("stale term: this device is not the coordinator; ask the current one")
        term = self._node.election.term
        spec = from_json(JobSpec, spec_json)
        description = from_json(ModelDescription, description_json)
        self._jobs.setdefault(job_id, JobRecord(status=JobStatus(
            job_id=job_id, state=JobState.LAUNCHING, spec_json=spec_json, submitter_id=caller,
            steps_total=spec.steps, created_at=time.time())))
        unusable = set(exclude) | self._draining
        # A re-plan after a failure does not wait on measurements (cached shapes and the default link stand in).
        planning = await self._planning_offers(spec, description, description_json, measure=not resume)
        for attempt in range(3):
            offers = [o for o in planning if o.device_id not in unusable]
            planned_spec = spec
            if resume and spec.devices > len(offers) >= 1:
                # After a failure the job goes on with what is left rather than waiting for the lost device.
                planned_spec = replace(spec, devices=len(offers), replicas=0 if spec.replicas > 1 else spec.replicas)
            profiles, links = planning_inputs(self._node, offers)
            plan = plan_job(planned_spec, description, offers, objective=spec.objective, profiles=profiles,
                            links=links, driver=caller)
            plan_json = to_json(plan)
            logger.info("job %s planned (term %d): %s", job_id, term, plan.reason)
            endpoints, failed = await self._start_workers(job_id, term, caller, spec_json, plan, plan_json,
                                                          description_json)
            if not failed:
                self._jobs[job_id].update(plan_json=plan_json, term=term, state=JobState.RUNNING)
                return LaunchResult(plan_json=plan_json, endpoints=tuple(endpoints), term=term)
            await self.stop_workers(plan, job_id)
            newer = next(((d, e) for d, e in failed.items() if isinstance(e, StaleTermError)), None)
            if newer is not None:
                # Not a lost device: the household elected another coordinator since this launch began.
                raise StaleTermError(f"device {newer[0]} follows a newer coordinator ({newer[1]})")
            if not resume or attempt == 2:
                device, error = next(iter(failed.items()))
                raise UnavailableError(f"device {device} could not start its worker: {error}")
            logger.warning("job %s: %s could not start a worker; re-planning without", job_id, ", ".join(failed))
            unusable |= set(failed)
        raise AssertionError("unreachable")

    async def _start_workers(self, job_id: str, term: int, submitter: DeviceId, spec_json: str, plan: JobPlan,
                             plan_json: str, description_json: str
                             ) -> tuple[list[WorkerEndpoint], dict[str, CetdError]]:
        """Order every worker of ``plan`` started; return the endpoints and the devices that failed."""

        async def start(worker: WorkerAssignment) -> WorkerEndpoint:
            order = WorkerLaunch(term=term, coordinator_id=self.me, job_id=job_id, rank=worker.rank,
                                 spec_json=spec_json, plan_json=plan_json, description_json=description_json,
                                 submitter_id=submitter)
            if worker.device_id == self.me:
                address = await self.start_worker(order, self.me)
            else:
                address = await self._client(worker.device_id).start_worker(order)
            return WorkerEndpoint(rank=worker.rank, device_id=worker.device_id, address=address)

        results = await asyncio.gather(*(start(w) for w in plan.workers), return_exceptions=True)
        endpoints = [r for r in results if isinstance(r, WorkerEndpoint)]
        failed: dict[str, CetdError] = {}
        for worker, result in zip(plan.workers, results, strict=True):
            if isinstance(result, CetdError):
                failed[worker.device_id] = result
            elif isinstance(result, BaseException):
                raise result
        return endpoints, failed

    async def _planning_offers(self, spec: JobSpec, description: ModelDescription, description_json: str, *,
                               measure: bool) -> list[DeviceOffer]:
        """Every live device's offer for this job, with its times for the job's own shapes; with ``measure``,
        devices time shapes they have not timed, and links never measured are probed first."""
        live = self.live_devices()
        machines = {d: c.machine for d, c in self._capabilities().items()}
        shapes = await self.shapes.gather(live, description_json, spec, measure=measure, machines=machines)
        if measure:
            await self._node.measure_missing_links(live)
        return member_offers(self._node, description, spec.seq_len, shapes)

    async def profile(self, query: ProfileQuery, caller: DeviceId) -> ProfileAnswer:
        """The Profile RPC: this device's times for the job's shapes (`shape_profiles`)."""
        return await self.shapes.answer(query)

    async def echo(self, address: str, caller: DeviceId) -> str:
        """The Echo RPC: answer the caller's transport profile at ``address`` (`ShapeProfiles.serve_echo`)."""
        if not address:
            raise JobError("no profile address to echo")
        return await self.shapes.serve_echo(address, tls_server_name(caller))

    async def _find_echo(self, address: str) -> EchoFound:
        """Another live device to echo this device's transport profile at ``address``, in `echo_order`; none
        when none would (`EchoFound.later` when one refused only for now)."""
        capabilities = self._capabilities()
        later = False
        for device_id in echo_order(str(self.me), capabilities, self.live_devices()):
            try:
                echo = await self._client(device_id).echo(address, timeout=ECHO_ASK_TIMEOUT)
            except (CetdError, OSError, TimeoutError) as error:
                logger.info("%s does not echo the transport profile: %s", short_id(device_id), error)
                later = later or isinstance(error, UnavailableError)
                continue
            return EchoFound((echo, tls_server_name(DeviceId(device_id))))
        logger.info("no other device echoes the transport profile %s", "now" if later else "(timing it here)")
        return EchoFound(None, later=later)

    async def plan(self, spec_json: str, description_json: str, remove: tuple[str, ...], add_json: str,
                   caller: DeviceId) -> PlanAnswer:
        """`cetctl plan --what-if`: describe the model here, then ask the coordinator for the forecast."""
        spec = from_json(JobSpec, spec_json)
        if not description_json:
            description_json = await self._describe_only(spec_json)
        coordinator = await self._wait_for_coordinator()
        if coordinator != self.me:
            return await self._client(coordinator).plan(spec_json, description_json, remove, add_json)
        description = from_json(ModelDescription, description_json)
        offers = [o for o in await self._planning_offers(spec, description, description_json, measure=True)
                  if o.device_id not in self._draining]
        try:
            added = [DeviceOffer(**d) for d in json.loads(add_json or "[]")]
        except (TypeError, ValueError) as error:
            raise JobError(f"malformed hypothetical device: {error}") from None
        profiles, links = planning_inputs(self._node, [*offers, *added])
        asking = caller if caller in {o.device_id for o in offers} else self.me  # would run the job's driver
        planned = what_if(spec, description, offers, remove=remove, add=added, objective=spec.objective,
                          profiles=profiles, links=links, driver=asking)
        return PlanAnswer(plan_json=to_json(planned.plan), prediction_json=json.dumps(asdict(planned.prediction)),
                          left_out_json=json.dumps(planned.left_out))

    async def _describe_only(self, spec_json: str) -> str:
        driver = await self._start_driver("the model check", "what-if", spec_json,
                                          self._state.path / "jobs" / "what-if.log")
        try:
            described = await driver.expect("described", DESCRIBE_TIMEOUT)
        finally:
            await driver.stop()
        return json.dumps(described["description"])

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
        return await self.workers.start(launch)

    async def _tell_submitter_worker_failed(self, job_id: str, submitter: str, reason: str, fatal: bool) -> None:
        try:
            if submitter == self.me:
                await self.worker_failed(job_id, self.me, reason, fatal, self.me)
            elif submitter:
                await self._client(submitter).worker_failed(job_id, self.me, reason, fatal)
        except CetdError as error:
            logger.warning("could not tell the submitter of %s that its worker failed: %s", job_id, error)

    async def worker_failed(self, job_id: str, device_id: str, reason: str, fatal: bool, caller: DeviceId) -> None:
        """Submitter: the worker of ``job_id`` on ``device_id`` failed; abort the running step now."""
        if caller != device_id:
            raise NotAuthorizedError(f"device {caller} reported a failure of device {device_id}'s worker")
        record = self._jobs.get(job_id)
        if record is None or record.supervisor is None:
            return
        await record.supervisor.worker_failed(device_id, reason, fatal)

    async def connect_worker(self, term: int, coordinator_id: str, job_id: str,
                             endpoints: tuple[WorkerEndpoint, ...], caller: DeviceId) -> None:
        self._node.election.validate_command(term, DeviceId(coordinator_id))
        await self.workers.connect(job_id, caller, peer_map(endpoints))

    async def stop_worker(self, job_id: str, caller: DeviceId) -> WorkerUsage:
        return await self.workers.stop(job_id)

    # -- leaving devices -----------------------------------------------------------------------------

    async def leave(self, job_id: str, device_id: str, caller: DeviceId) -> None:
        """Submitter: move ``job_id`` off ``device_id`` (asked by that device, or by the coordinator)."""
        if caller not in (device_id, self.coordinator_id(), self.me):
            raise NotAuthorizedError(f"device {caller} may not move job {job_id} off device {device_id}")
        record = self._jobs.get(job_id)
        if record is None or record.supervisor is None:
            raise JobError(f"job {job_id} is not supervised by this device")
        await record.supervisor.leave(device_id)

    async def drain(self, device_id: str, caller: DeviceId) -> list[str]:
        """Keep ``device_id`` out of every plan and move the jobs running on it elsewhere."""
        coordinator = self.coordinator_id()
        if coordinator is not None and coordinator != self.me:
            return await self._client(coordinator).drain(device_id)
        self._draining.add(device_id)
        moved = []
        for record in list(self._jobs.values()):
            plan_json = record.status.plan_json
            if record.status.state.finished or not plan_json:
                continue
            if device_id not in {w.device_id for w in from_json(JobPlan, plan_json).workers}:
                continue
            submitter = record.status.submitter_id
            with contextlib.suppress(CetdError):
                if submitter == self.me:
                    await self.leave(record.status.job_id, device_id, self.me)
                else:
                    await self._client(submitter).leave(record.status.job_id, device_id)
                moved.append(record.status.job_id)
        logger.info("device %s drained; jobs moved: %s", device_id, ", ".join(moved) or "none")
        return moved

    async def leave_before_shutdown(self, timeout: timedelta = timedelta(seconds=100)) -> None:
        """systemd stop: ask the submitters to move our workers' jobs elsewhere, wait until they did."""
        for job_id, submitter in self.workers.jobs().items():
            with contextlib.suppress(CetdError):
                if submitter == self.me:
                    await self.leave(job_id, self.me, self.me)
                elif submitter:
                    await self._client(submitter).leave(job_id, self.me)
        await self.workers.wait_all(timeout.total_seconds())

    # -- queries --------------------------------------------------------------------------------------

    async def get(self, job_id: str) -> JobStatus:
        record = self._jobs.get(job_id)
        if record is not None:
            return record.status
        coordinator = self._node.election.coordinator_id
        if coordinator is not None and coordinator != self.me:
            return await self._client(coordinator).get(job_id)
        raise JobError(f"no job {job_id}")

    async def list_jobs(self) -> list[JobStatus]:
        jobs = {job_id: r.status for job_id, r in self._jobs.items()}
        coordinator = self._node.election.coordinator_id
        if coordinator is not None and coordinator != self.me:
            with contextlib.suppress(CetdError):
                for status in await self._client(coordinator).list_jobs():
                    jobs.setdefault(status.job_id, status)
        return sorted(jobs.values(), key=lambda s: s.created_at)

    async def watch(self, job_id: str) -> AsyncIterator[JobEvent]:
        record = self._jobs.get(job_id)
        if record is None or record.status.submitter_id != self.me:
            status = await self.get(job_id)
            if status.submitter_id and status.submitter_id != self.me:
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
        if record is not None and record.status.submitter_id == self.me:
            if record.task is not None and not record.task.done():
                record.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await record.task
            self.finish(record, JobState.CANCELLED, "cancelled by the user")
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
        await self.workers.close()
