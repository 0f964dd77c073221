"""The plain-data contract of a training job, shared by the planner, the daemon and the workers.

Torch-free on purpose: `cetd.cluster` (the planner) and the daemon use these types without importing
torch; only the worker processes turn them into models and tensors. Everything here round-trips
through JSON (`to_json` / `from_json`) because it crosses process and device boundaries.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from cetd.errors import JobError

Parallelism = Literal["single", "pipeline", "tensor", "data"]
Schedule = Literal["gpipe", "1f1b"]
Precision = Literal["float32", "float64"]
Objective = Literal["throughput", "energy"]
"""What the planner optimises: seconds per sample, or joules per sample."""

DRIVER_RANK = 0
"""Rank of the driver in a job's channel world: the process on the submitting device that owns the
data file and the output folder. Workers are ranks 1..N."""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """What the user asked for (`cetctl train`)."""

    model: str
    """A local ``save_pretrained`` folder on the submitting device, or a preset name (``gpt2-tiny``…)."""
    data: str
    """Path of the data file on the submitting device (JSONL text, or QNLI-style pairs JSONL/TSV)."""
    output: str = ""
    """Folder on the submitting device for the trained model (``save_pretrained`` + tokenizer); "" = none."""
    steps: int = 20
    global_batch: int = 8
    """Examples per optimizer step."""
    micro_batches: int = 4
    """Micro-batches per step (pipeline schedules, gradient accumulation)."""
    seq_len: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    seed: int = 0
    parallelism: Parallelism | Literal["auto"] = "auto"
    devices: int = 0
    """Number of devices to train on; 0 lets the planner choose."""
    schedule: Schedule = "1f1b"
    sync_every: int = 1
    """Data parallel: average every k steps (k=1: gradients every step, identical to one device)."""
    replicas: int = 0
    """Pipeline × data: copies of the pipeline, each on its share of the micro-batches; 0 lets the
    planner choose, 1 = no replicas."""
    precision: Precision = "float32"
    objective: Objective = "throughput"
    """What the planner optimises: ``throughput`` (seconds per sample) or ``energy`` (joules per sample)."""
    checkpoint_every: int = 5
    """Write a checkpoint after every k-th optimizer step; 0 = only by time (``checkpoint_seconds``)."""
    checkpoint_seconds: float = 0.0
    """Also write one after each step that starts this many seconds or more after the last checkpoint
    (or the start of the run); 0 = off."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept per job (the newest); older ones are deleted."""

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"--steps must be at least 1, not {self.steps}"),
            (self.global_batch >= 1, f"--batch must be at least 1, not {self.global_batch}"),
            (self.micro_batches >= 1, f"--micro-batches must be at least 1, not {self.micro_batches}"),
            (self.global_batch % self.micro_batches == 0,
             f"--batch {self.global_batch} is not divisible into {self.micro_batches} micro-batches"),
            (self.seq_len >= 2, f"--seq-len must be at least 2, not {self.seq_len}"),
            (self.lr > 0, f"--lr must be positive, not {self.lr}"),
            (self.devices >= 0, f"--devices must not be negative, not {self.devices}"),
            (self.sync_every >= 1, f"--sync-every must be at least 1, not {self.sync_every}"),
            (self.replicas >= 0, f"--replicas must not be negative, not {self.replicas}"),
            (self.replicas <= 1 or self.parallelism in ("auto", "pipeline"),
             f"--replicas {self.replicas} copies a pipeline; it does not apply to --parallelism {self.parallelism}"),
            (self.replicas <= 1 or self.sync_every == 1,
             f"--replicas {self.replicas} all-reduces gradients every step; --sync-every must be 1, "
             f"not {self.sync_every}"),
            (self.replicas <= self.micro_batches,
             f"--replicas {self.replicas} needs at least {self.replicas} micro-batches per step, "
             f"not {self.micro_batches}"),
            (self.parallelism in (*get_args(Parallelism), "auto"), f"unknown parallelism {self.parallelism!r}"),
            (self.schedule in get_args(Schedule), f"unknown schedule {self.schedule!r}"),
            (self.precision in get_args(Precision), f"unknown precision {self.precision!r}"),
            (self.objective in get_args(Objective), f"unknown objective {self.objective!r} (throughput or energy)"),
            (self.checkpoint_every >= 0, f"--checkpoint-every must not be negative, not {self.checkpoint_every}"),
            (self.checkpoint_seconds >= 0, f"--checkpoint-seconds must not be negative, not {self.checkpoint_seconds}"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1, not {self.keep_checkpoints}"),
        ]
        for ok, message in checks:
            if not ok:
                raise JobError(message)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelDescription:
    """What the planner needs to know about a model, measured by the driver that loaded it."""

    family: str
    """``gpt2``, ``opt``, ``bert`` or ``distilbert``."""
    task: str
    """``causal_lm`` or ``sequence_classification``."""
    num_blocks: int
    hidden_size: int
    num_heads: int
    max_seq_len: int
    parameter_count: int
    block_parameter_count: int
    """Parameters of one transformer block."""
    config: dict[str, Any] = field(default_factory=dict)
    """The Hugging Face config (``config.to_dict()``): workers build the architecture from it."""


DEFAULT_RING_MIN_BYTES = 64 * 2**10
"""All-reduces of at least this many bytes go round a ring, smaller ones are exchanged whole
(`cetd.runtime.collectives`), unless a plan chooses otherwise (`JobPlan.ring_min_bytes`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerAssignment:
    """One worker's place in a plan."""

    rank: int
    """1..N (the driver is rank 0)."""
    device_id: str
    stage: int = 0
    """Pipeline stage index (0 when not pipelining)."""
    start_block: int = 0
    end_block: int = 0
    """Blocks [start_block, end_block) of the model this worker holds (pipeline)."""
    tp_index: int = 0
    """Position in its tensor-parallel group."""
    dp_index: int = 0
    """Position among the data-parallel replicas."""


@dataclass(frozen=True, slots=True, kw_only=True)
class JobPlan:
    """How a job runs: the chosen parallelism and every worker's share."""

    parallelism: Parallelism
    workers: tuple[WorkerAssignment, ...]
    schedule: Schedule = "1f1b"
    micro_batches: int = 1
    reason: str = ""
    """One sentence on why this plan (shown by `cetctl status`)."""
    estimated_memory_bytes: dict[str, int] = field(default_factory=dict)
    """Predicted peak training memory per device ID."""
    objective: Objective = "throughput"
    """What the planner optimised when it chose this plan."""
    predicted_step_seconds: float = 0.0
    """The cost model's wall time of one optimizer step (0 = not predicted)."""
    predicted_seconds_per_sample: float = 0.0
    """``predicted_step_seconds`` over the global batch."""
    predicted_joules_per_sample: float = 0.0
    """The energy model's joules per training sample over all taking part (0 = not predicted)."""
    speed_sources: dict[str, str] = field(default_factory=dict)
    """Per device ID: where the forecast's speed came from (``measured`` for the job's own shapes,
    ``profiled`` reference block scaled by FLOPs, or ``estimated`` from its cores)."""
    ring_min_bytes: int = DEFAULT_RING_MIN_BYTES
    """Tensor-parallel activations of at least this many bytes are all-reduced round a ring, smaller ones
    exchanged whole: the planner sets it where the cost model finds the two equally fast for the workers'
    message costs and links (`cetd.cluster.transport_costs.ring_min_bytes`)."""

    @property
    def world_size(self) -> int:
        """Driver plus workers."""
        return len(self.workers) + 1

    def worker(self, rank: int) -> WorkerAssignment:
        for assignment in self.workers:
            if assignment.rank == rank:
                return assignment
        raise KeyError(rank)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepReport:
    """Progress of one optimizer step, as the driver reports it."""

    step: int
    """1-based."""
    loss: float
    samples: int
    seconds: float
    """Wall time of this step."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ShapeTimes:
    """A device's measured times for one model at one micro-batch shape (`cetd.runtime.profiling`)."""

    block_seconds: float
    """One transformer block, forward + backward, per sample."""
    embedding_blocks: float
    """The embedding's forward + backward, in blocks."""
    head_blocks: float
    """The head and its loss, forward + backward, in blocks."""
    optimizer_seconds_per_parameter: float
    """One AdamW step, per parameter."""
    block_fixed_seconds: float = 0.0
    """Per micro-batch, the part of a block's time that a tensor-parallel split does not make smaller."""
    message_seconds: float = 0.0
    """One message hop over the tensor transport: both ends' work on this device (one message sent and one
    received, `cetd.runtime.transport_profile.near_hop_seconds`), its CPU over `cpu_share`, the wall
    time that work takes here (0: not measured)."""
    byte_seconds: float = 0.0
    """The same hop's extra time per byte (0: not measured)."""
    cpu_share: float = 0.0
    """CPU-seconds per wall second the device gave the profiler while it timed the block: about 1 per
    thread on a free core, the quota's share under a CPU quota, less when other work competes (0: not
    measured)."""


def to_json(value: Any) -> str:
    """Serialize one of this module's dataclasses (nested ones included)."""
    return json.dumps(dataclasses.asdict(value), sort_keys=True)


def from_json(cls: type[_T], text: str | bytes) -> _T:
    """Parse what `to_json` wrote for ``cls``; raises `JobError` on anything else."""
    try:
        data = json.loads(text)
        return _build(cls, data)
    except (ValueError, TypeError, KeyError) as error:
        raise JobError(f"malformed {cls.__name__}: {error}") from None


def _build(cls: type[_T], data: Any) -> _T:
    if cls is JobPlan:
        data = dict(data)
        data["workers"] = tuple(WorkerAssignment(**w) for w in data["workers"])
    return cls(**data)
