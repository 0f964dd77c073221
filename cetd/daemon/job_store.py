"""Durable job records on the submitting device: what a restarted daemon needs to resume its jobs.

``state_dir/jobs/<job>/job.json`` holds the spec, the state, the newest complete checkpoint and the
history of recoveries; it is rewritten atomically at every change of state and every checkpoint, so a
power cut loses at most the progress since the last checkpoint, never the job.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cetd.identity import StateDir, write_file_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovery:
    """One interruption of a job and how it was recovered."""

    at: float
    """When the failure was noticed (epoch seconds)."""
    cause: str
    """What failed, in one sentence."""
    device_id: str = ""
    failed_step: int = 0
    """The step that was running when the failure happened."""
    resumed_from: int = 0
    """The checkpoint step training went on from."""
    steps_redone: int = 0
    replan_s: float = 0.0
    """From noticing the failure to the new plan's workers running (planning and starting processes)."""
    reload_s: float = 0.0
    """From the workers running to the first resumed step starting (checkpoint read, shares sent)."""
    warmup_s: float = 0.0
    """The first resumed step's own duration."""
    recovered_s: float = 0.0
    """From noticing the failure to the first resumed step finishing."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointRecord:
    step: int
    at: float
    manifest: str
    term: int


@dataclass(kw_only=True)
class StoredJob:
    job_id: str
    spec_json: str
    state: str
    reason: str = ""
    created_at: float = 0.0
    finished_at: float = 0.0
    steps_done: int = 0
    checkpoints: list[CheckpointRecord] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @staticmethod
    def from_json(data: bytes) -> StoredJob:
        raw: dict[str, Any] = json.loads(data)
        raw["checkpoints"] = [CheckpointRecord(**c) for c in raw.get("checkpoints", [])]
        raw["recoveries"] = [Recovery(**r) for r in raw.get("recoveries", [])]
        return StoredJob(**raw)


class JobStore:
    """The submitter's durable job records."""

    def __init__(self, state: StateDir) -> None:
        self._root = state.path / "jobs"

    def job_dir(self, job_id: str) -> Path:
        return self._root / job_id

    def save(self, job: StoredJob) -> None:
        directory = self.job_dir(job.job_id)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            write_file_atomic(directory / "job.json", job.to_json(), 0o600)
        except OSError as error:
            # A full disk must not take the daemon down; the job record is rewritten at the next change.
            logger.error("could not record job %s: %s", job.job_id, error)

    def load_all(self) -> list[StoredJob]:
        jobs = []
        for path in sorted(self._root.glob("*/job.json")):
            try:
                jobs.append(StoredJob.from_json(path.read_bytes()))
            except (OSError, ValueError, TypeError, KeyError) as error:
                logger.error("ignoring unreadable job record %s: %s", path, error)
        return jobs
