"""Domain types of the jobs API, free of protobuf (see `jobs_codec` for the conversion).

Spec, plan and model description travel as JSON documents owned by `cetd.runtime.spec`; here they are
opaque strings so that the control plane never needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class JobState(Enum):
    QUEUED = "queued"
    DESCRIBING = "describing"
    """The driver on the submitting device loads and checks the model and the data."""
    LAUNCHING = "launching"
    """The coordinator plans and starts the workers."""
    RUNNING = "running"
    RECOVERING = "recovering"
    """A device of the plan failed or left; the job re-plans and resumes from its newest checkpoint."""
    PAUSED = "paused"
    """Waiting: a checkpoint could not be written (e.g. a full disk), or no plan fits the devices alive."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepProgress:
    step: int
    loss: float
    seconds: float
    samples: int


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStatus:
    """Everything `cetctl status JOB` shows."""

    job_id: str
    state: JobState
    reason: str = ""
    spec_json: str = ""
    plan_json: str = ""
    submitter_id: str = ""
    steps_done: int = 0
    steps_total: int = 0
    last_loss: float = 0.0
    seconds_per_sample: float = 0.0
    joules_per_sample: float = 0.0
    energy_source: str = ""
    output: str = ""
    created_at: float = 0.0
    finished_at: float = 0.0
    term: int = 0
    energy_json: str = "{}"
    """Joules per device with their source (model or meter)."""
    checkpoints: tuple[int, ...] = ()
    """Steps of the complete checkpoints kept."""
    recoveries_json: str = "[]"


@dataclass(frozen=True, slots=True, kw_only=True)
class JobEvent:
    """One item of a job's watch stream: the status, and the step that just finished (if any)."""

    status: JobStatus
    step: StepProgress | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerEndpoint:
    """Where the worker of one rank receives tensors."""

    rank: int
    device_id: str
    address: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchResult:
    plan_json: str
    endpoints: tuple[WorkerEndpoint, ...]
    term: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerLaunch:
    """The coordinator's order to start one worker (carries the coordinator's term)."""

    term: int
    coordinator_id: str
    job_id: str
    rank: int
    spec_json: str
    plan_json: str
    description_json: str
    submitter_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerUsage:
    """What a stopped worker used on its device."""

    cpu_seconds: float = 0.0
    """CPU time while it trained: from its first step on."""
    startup_cpu_seconds: float = 0.0
    """CPU time before that: imports, building its share of the model, taking its weights (all of it, for a
    worker that never began training). Not part of the job's J/sample; reported beside it."""
    wall_seconds: float = 0.0
    joules: float = 0.0
    """Measured by the device's meter while it trained, else 0."""
    energy_source: str = ""
    failure: str = ""
    """Why the worker failed, if it did."""
    fatal: bool = False
    """The failure is one re-planning cannot help (a peer violated the protocol)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProfileQuery:
    """The coordinator's question to a device: how fast are this model's layers at this shape here?"""

    description_json: str
    micro_batch: int
    seq_len: int
    precision: str
    measure: bool
    """Time the shape now when it is not cached (and the device is idle); else answer from the cache."""
    again: bool = False
    """Time the shape's block and the transport once more (the shape is cached): another sample for the
    device's medians."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProfileAnswer:
    """A device's times for a shape (`cetd.runtime.profiling.ShapeTimes` as JSON), or why it has none."""

    times_json: str
    reason: str = ""
    samples: int = 0
    """How many fresh timings the block and the message costs in ``times_json`` are each the median of, at
    least (0: the transport was not timed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanAnswer:
    """`cetctl plan --what-if`: the plan, its forecast and why devices were left out (JSON documents)."""

    plan_json: str
    prediction_json: str
    left_out_json: str
