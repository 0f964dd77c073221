"""Supervision of one job process (driver or worker): spawn fresh, talk JSON lines, reap.

A job process is a new Python interpreter (`python -m cetd.daemon.worker_main`), never a fork of the
daemon, whose live gRPC streams would not survive one. Its stderr goes to a log file next to the
job's state; when it dies, the last lines of that log become the failure reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil

from cetd.errors import JobError

logger = logging.getLogger(__name__)

JOB_PROCESS_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024**2), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024**2)}
"""glibc allocator settings for job processes. By default glibc serves every buffer of 128 KiB or more
with its own mmap and returns it on free, so each tensor frame is faulted in afresh; keeping those
buffers in the heap raised loopback throughput at 1 MiB tensors from ≈0.6× to ≈0.95× of a raw TLS
socket (bench/transport, which applies the same settings to every transport it compares)."""


class JobProcess:
    """One running driver or worker; an async context manager that kills it on exit."""

    def __init__(self, *, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._process: asyncio.subprocess.Process | None = None
        self._started = 0.0
        self._cpu_seconds = 0.0
        self._cpu_taken = 0.0
        self._startup_cpu: float | None = None

    async def start(self, launch: dict[str, Any]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cetd.daemon.worker_main",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **JOB_PROCESS_MALLOC}, start_new_session=True,
                limit=16 * 1024 * 1024,
            )
        self._started = time.monotonic()
        await self.send(launch)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def send(self, message: dict[str, Any]) -> None:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write((json.dumps(message) + "\n").encode())
        with contextlib.suppress(ConnectionError):
            await self._process.stdin.drain()

    async def next_event(self, timeout: timedelta | None = None) -> dict[str, Any]:
        """The next event the process prints; a process that dies becomes a ``failed`` event."""
        assert self._process is not None and self._process.stdout is not None
        try:
            line = await asyncio.wait_for(self._process.stdout.readline(),
                                          timeout.total_seconds() if timeout else None)
        except TimeoutError:
            raise JobError(f"{self.name} did not answer within {timeout}") from None
        if not line:
            code = await self._process.wait()
            return {"event": "failed", "reason": f"{self.name} exited with code {code}: {self._log_tail()}"}
        try:
            event: dict[str, Any] = json.loads(line)
        except ValueError:
            return {"event": "log", "line": line.decode(errors="replace").rstrip()}
        return event

    async def expect(self, wanted: str, timeout: timedelta | None = None) -> dict[str, Any]:
        """Wait for event ``wanted``; raise `JobError` with the process's reason if it fails first."""
        while True:
            event = await self.next_event(timeout)
            if event.get("event") == wanted:
                return event
            if event.get("event") == "failed":
                raise JobError(str(event.get("reason", f"{self.name} failed")))

    async def wait(self) -> int | None:
        """Wait until the process has exited by itself; return its exit code."""
        if self._process is None:
            return None
        return await self._process.wait()

    def cpu_seconds(self) -> float:
        """CPU time (all threads, user + system) the process used so far; kept after it exits."""
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(self._process.pid).cpu_times()
                self._cpu_seconds = times.user + times.system
        return self._cpu_seconds

    def note_cpu_seconds(self, reported: float) -> None:
        """The process's own account of its CPU time (it reports it when it ends)."""
        self.cpu_seconds()
        self._cpu_seconds = max(self._cpu_seconds, reported)

    def take_cpu_seconds(self) -> float:
        """CPU time used since the last call, start-up excluded (the driver lives through several
        incarnations)."""
        now = self.cpu_seconds()
        taken, self._cpu_taken = max(now - self._cpu_taken, 0.0), max(now, self._cpu_taken)
        return taken

    def mark_training(self, reported: float) -> None:
        """The process says it has started (its CPU time so far, ``reported``): what came before is its
        start-up, which the job's J/sample leaves out (`startup_cpu_seconds`)."""
        if self._startup_cpu is None:
            self._startup_cpu = max(reported, 0.0)
            self._cpu_taken = max(self._cpu_taken, self._startup_cpu)

    @property
    def startup_cpu_seconds(self) -> float:
        """CPU time before `mark_training`; all of it for a process never marked."""
        return self.cpu_seconds() if self._startup_cpu is None else min(self._startup_cpu, self.cpu_seconds())

    def training_cpu_seconds(self) -> float:
        """CPU time since `mark_training` (0 for a process never marked)."""
        return max(self.cpu_seconds() - self.startup_cpu_seconds, 0.0)

    def wall_seconds(self) -> float:
        return time.monotonic() - self._started if self._started else 0.0

    async def stop(self, grace: timedelta = timedelta(seconds=3)) -> int | None:
        """Ask politely (SIGTERM), then kill; return the exit code."""
        process = self._process
        if process is None:
            return None
        self.cpu_seconds()  # the last reading before it is gone
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), grace.total_seconds())
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        return process.returncode

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        interesting = [line for line in lines if line.strip()][-3:]
        return " | ".join(interesting) or "no output"

    async def __aenter__(self) -> JobProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
