"""This device's worker processes: one per job it takes part in, started, connected and stopped on order.

`JobManager` checks who gives an order (the coordinator of the current term, the job's submitter);
this module runs what the order asks for: it spawns the worker (`JobProcess`), follows its events,
remembers who may direct it and, when the worker fails by itself, tells the submitter at once. Stopping
a worker returns what it used: CPU and wall seconds, and joules where the device has an energy meter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from cetd.cluster.energy_meters import detect_meters, read_meters
from cetd.errors import CetdError, JobError, NotAuthorizedError
from cetd.transport.job_types import WorkerLaunch, WorkerUsage

from .job_process import JobProcess

__all__ = ["WORKER_START_TIMEOUT", "LocalWorkers"]

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT = timedelta(minutes=5)
"""How long a worker may take to build its share of the model and say it is ready."""

FailureReport = Callable[[str, str, str, bool], Awaitable[None]]
"""``(job_id, submitter_id, reason, fatal)``: tell a job's submitter that this device's worker failed."""


class LocalWorkers:
    """The worker processes running on this device, by job ID."""

    def __init__(self, launch_fields: Callable[[], dict[str, Any]], log_path: Callable[[str, str], Path],
                 report_failure: FailureReport, spawn: Callable[[Any, str], asyncio.Task[Any]]) -> None:
        """
        Args:
            launch_fields: what every job process of this daemon is started with (state dir, host, threads…).
            log_path: ``(job_id, role)`` → the log file of that process.
            report_failure: called when a worker fails by itself (not when it is stopped).
            spawn: starts a background task the daemon owns (and cancels on close).
        """
        self._launch_fields = launch_fields
        self._log_path = log_path
        self._report_failure = report_failure
        self._spawn = spawn
        self.meters = detect_meters(Path("/"))
        self._meter_start: dict[str, float] = {}
        self._processes: dict[str, JobProcess] = {}
        self._directors: dict[str, set[str]] = {}  # job → device IDs allowed to connect its worker
        self._submitter: dict[str, str] = {}
        self._follow: dict[str, asyncio.Task[Any]] = {}
        self._failure: dict[str, tuple[str, bool]] = {}

    def __bool__(self) -> bool:
        """Whether any worker runs here (a job trains on this device)."""
        return bool(self._processes)

    def jobs(self) -> dict[str, str]:
        """Job ID → its submitter, for every worker running here."""
        return {job_id: self._submitter.get(job_id, "") for job_id in self._processes}

    async def start(self, launch: WorkerLaunch) -> str:
        """Start the worker ``launch`` describes (replacing this job's previous one); return its address.

        Raises:
            CetdError: the worker did not get ready (its log's last lines say why).
        """
        key = launch.job_id
        if key in self._processes:
            await self._processes.pop(key).stop()
        process = JobProcess(name=f"worker rank {launch.rank}", log_path=self._log_path(key, f"worker-{launch.rank}"))
        self._processes[key] = process
        self._directors[key] = {launch.coordinator_id, launch.submitter_id}
        self._submitter[key] = launch.submitter_id
        await process.start({
            **self._launch_fields(), "role": "worker", "job_id": launch.job_id, "rank": launch.rank,
            "spec": json.loads(launch.spec_json), "plan": json.loads(launch.plan_json),
            "description": json.loads(launch.description_json),
        })
        try:
            ready = await process.expect("ready", WORKER_START_TIMEOUT)
        except CetdError:
            await process.stop()
            self._processes.pop(key, None)
            self._directors.pop(key, None)
            self._submitter.pop(key, None)
            raise
        if self.meters:
            self._meter_start[key] = sum(r.joules for r in read_meters(self.meters))
        logger.info("worker rank %d of job %s listening on %s", launch.rank, launch.job_id, ready["address"])
        self._failure.pop(key, None)
        self._follow[key] = self._spawn(self._follow_events(key, process), f"worker-{key}")
        return str(ready["address"])

    async def _follow_events(self, job_id: str, process: JobProcess) -> None:
        while True:
            event = await process.next_event()
            process.note_cpu_seconds(float(event.get("cpu_seconds", 0.0)))
            if event.get("event") == "training":
                process.mark_training(float(event.get("cpu_seconds", 0.0)))
                if self.meters and job_id in self._meter_start:  # the meter, too, counts training from here
                    self._meter_start[job_id] = sum(r.joules for r in read_meters(self.meters))
                continue
            if event.get("event") == "failed":
                reason, fatal = str(event.get("reason")), bool(event.get("fatal"))
                logger.error("worker of job %s failed: %s", job_id, reason)
                self._failure[job_id] = (reason, fatal)
                if self._processes.get(job_id) is process:  # not stopped on purpose: tell the submitter now
                    await self._report_failure(job_id, self._submitter.get(job_id, ""), reason, fatal)
                return
            if event.get("event") == "done":
                logger.info("worker of job %s finished", job_id)
                return

    async def connect(self, job_id: str, caller: str, peers: dict[str, Any]) -> None:
        """Hand the job's worker its peers' addresses, on the order of its coordinator or submitter.

        Raises:
            JobError: no worker of that job runs here.
            NotAuthorizedError: ``caller`` neither started nor submitted the job.
        """
        process = self._processes.get(job_id)
        if process is None:
            raise JobError(f"no worker of job {job_id} runs on this device")
        if caller not in self._directors.get(job_id, set()):
            raise NotAuthorizedError(f"device {caller} may not direct job {job_id}")
        await process.send({"peers": peers})

    async def stop(self, job_id: str) -> WorkerUsage:
        """Stop the job's worker (if one runs here) and return what it used and why it failed, if it did."""
        process = self._processes.pop(job_id, None)
        if process is None:
            return WorkerUsage()
        self._directors.pop(job_id, None)
        self._submitter.pop(job_id, None)
        follow = self._follow.pop(job_id, None)
        if follow is not None and not process.running:
            # It ended by itself: let its last words (a failure reason) be read first.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(follow), 2.0)
        await process.stop()
        failure, fatal = self._failure.pop(job_id, ("", False))
        joules, source = 0.0, ""
        started = self._meter_start.pop(job_id, None)
        if started is not None and self.meters:
            readings = read_meters(self.meters)
            joules, source = sum(r.joules for r in readings) - started, readings[0].source
        return WorkerUsage(cpu_seconds=process.training_cpu_seconds(), startup_cpu_seconds=process.startup_cpu_seconds,
                           wall_seconds=process.wall_seconds(), joules=joules,
                           energy_source=source, failure=failure, fatal=fatal)

    async def wait_all(self, timeout: float) -> None:
        """Wait until every worker here has ended, at most ``timeout`` seconds."""
        waits = [asyncio.ensure_future(p.wait()) for p in self._processes.values()]
        if waits:
            _, still_running = await asyncio.wait(waits, timeout=timeout)
            for task in still_running:
                task.cancel()

    async def close(self) -> None:
        """Stop every worker (the daemon is stopping)."""
        for process in list(self._processes.values()):
            await process.stop()
        self._processes.clear()
        self._directors.clear()
        self._submitter.clear()
