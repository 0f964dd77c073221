"""The job planner: which devices take part, with which parallelism and which share of the model.

Pure: a function of the job, the model's description and the devices on offer. It never lets a device's
predicted training memory exceed what that device offers, and it refuses with a sentence when no plan
fits. Stage boundaries balance the blocks, counting the embedding and the head as extra load on the
first and last stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cetd.errors import JobError
from cetd.runtime.spec import JobPlan, JobSpec, ModelDescription, Parallelism, WorkerAssignment

RUNTIME_OVERHEAD_BYTES = 400 * 1024**2
"""Resident memory of a worker before any model: Python, torch, grpc (measured: ~350 MB here)."""

OPTIMIZER_COPIES = 4
"""Weights, gradients and AdamW's two moments: four numbers per parameter."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceOffer:
    """A live member as the planner sees it."""

    device_id: str
    memory_bytes: int
    cores: int
    rank: float = 0.0


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def bytes_per_number(spec: JobSpec) -> int:
    return 8 if spec.precision == "float64" else 4


def activation_bytes(spec: JobSpec, description: ModelDescription, blocks: int) -> int:
    """Activations kept for backward by ``blocks`` blocks for the micro-batches in flight.

    Per block and token roughly 16 hidden-sized tensors plus the attention scores (heads × seq); with
    1F1B at most ``stages`` micro-batches are in flight, with GPipe all of them: we take all (safe).
    """
    micro = max(1, spec.global_batch // spec.micro_batches)
    tokens = micro * spec.seq_len
    per_block = tokens * (16 * description.hidden_size + 2 * description.num_heads * spec.seq_len)
    return per_block * max(blocks, 1) * spec.micro_batches * bytes_per_number(spec)


def training_memory(spec: JobSpec, description: ModelDescription, *, parameters: int, blocks: int) -> int:
    """Predicted peak memory of a worker holding ``parameters`` parameters and ``blocks`` blocks."""
    state = parameters * bytes_per_number(spec) * OPTIMIZER_COPIES
    return RUNTIME_OVERHEAD_BYTES + state + activation_bytes(spec, description, blocks)


def embedding_and_head_parameters(description: ModelDescription) -> int:
    return max(0, description.parameter_count - description.num_blocks * description.block_parameter_count)


def split_blocks(num_blocks: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous block ranges, the remainder going to the middle stages (the ends carry embedding/head)."""
    if not 1 <= stages <= num_blocks:
        raise JobError(f"cannot split {num_blocks} blocks into {stages} pipeline stages")
    base, extra = divmod(num_blocks, stages)
    sizes = [base] * stages
    middle = list(range(1, stages - 1)) or list(range(stages))
    for i in range(extra):
        sizes[middle[i % len(middle)]] += 1
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges


def _choose_devices(devices: Sequence[DeviceOffer], count: int) -> list[DeviceOffer]:
    ordered = sorted(devices, key=lambda d: (d.memory_bytes, d.cores, d.rank, d.device_id), reverse=True)
    return ordered[:count]


def plan_job(spec: JobSpec, description: ModelDescription, devices: Sequence[DeviceOffer]) -> JobPlan:
    """Plan ``spec`` on ``devices``.

    Raises:
        JobError: too few devices, a parallelism the model cannot be split for, or a share that exceeds
            a device's memory (the message says how much is needed and available).
    """
    if not devices:
        raise JobError("no device is available to train on")
    if spec.seq_len > description.max_seq_len:
        raise JobError(f"--seq-len {spec.seq_len} is above the model's maximum of {description.max_seq_len}")
    whole = training_memory(spec, description, parameters=description.parameter_count,
                            blocks=description.num_blocks)
    largest = max(d.memory_bytes for d in devices)
    parallelism: Parallelism
    if spec.parallelism == "auto":
        parallelism = "single" if spec.devices in (0, 1) and whole <= largest else "pipeline"
    else:
        parallelism = spec.parallelism
    if parallelism == "single":
        if whole > largest:
            raise JobError(
                f"the model needs {_gib(whole)} to train on one device but the largest device offers "
                f"{_gib(largest)}; train it with --parallelism pipeline or tensor over several devices"
            )
        count = 1
    elif spec.devices:
        count = spec.devices
    else:
        count = _devices_needed(spec, description, devices, parallelism)
    if count > len(devices):
        raise JobError(f"the job asks for {count} devices but only {len(devices)} are alive")
    chosen = _choose_devices(devices, count)
    workers, memory = _assign(spec, description, parallelism, chosen)
    for device in chosen:
        need = memory[device.device_id]
        if need > device.memory_bytes:
            raise JobError(
                f"device {device.device_id} would need {_gib(need)} for its share under {parallelism} "
                f"parallelism over {count} devices but offers {_gib(device.memory_bytes)}; use more devices"
            )
    reason = (
        f"{parallelism} over {count} device(s); largest share {_gib(max(memory.values()))}, "
        f"whole model would need {_gib(whole)}"
    )
    return JobPlan(parallelism=parallelism, workers=tuple(workers), schedule=spec.schedule,
                   micro_batches=spec.micro_batches, reason=reason, estimated_memory_bytes=memory)


def _devices_needed(spec: JobSpec, description: ModelDescription, devices: Sequence[DeviceOffer],
                    parallelism: Parallelism) -> int:
    """The fewest devices whose shares all fit (pipeline, tensor); data parallel uses every device."""
    limit = len(devices) if parallelism != "pipeline" else min(len(devices), description.num_blocks)
    if parallelism == "tensor":
        limit = min(limit, description.num_heads)
    if parallelism == "data":
        return limit
    for count in range(2, limit + 1):
        chosen = _choose_devices(devices, count)
        _, memory = _assign(spec, description, parallelism, chosen)
        if all(memory[d.device_id] <= d.memory_bytes for d in chosen):
            return count
    return limit


def _assign(spec: JobSpec, description: ModelDescription, parallelism: Parallelism,
            chosen: Sequence[DeviceOffer]) -> tuple[list[WorkerAssignment], dict[str, int]]:
    n = len(chosen)
    ends = embedding_and_head_parameters(description)
    workers: list[WorkerAssignment] = []
    memory: dict[str, int] = {}
    if parallelism == "pipeline":
        for stage, ((start, end), device) in enumerate(zip(split_blocks(description.num_blocks, n), chosen,
                                                         strict=True)):
            params = (end - start) * description.block_parameter_count
            if stage == 0 or stage == n - 1:
                params += ends // 2 if n > 1 else ends
            workers.append(WorkerAssignment(rank=stage + 1, device_id=device.device_id, stage=stage,
                                            start_block=start, end_block=end))
            memory[device.device_id] = training_memory(spec, description, parameters=params, blocks=end - start)
    elif parallelism == "tensor":
        if n > description.num_heads:
            raise JobError(f"tensor parallelism over {n} devices needs at least {n} attention heads; "
                           f"the model has {description.num_heads}")
        for index, device in enumerate(chosen):
            params = ends + description.num_blocks * description.block_parameter_count // n
            workers.append(WorkerAssignment(rank=index + 1, device_id=device.device_id, tp_index=index,
                                            end_block=description.num_blocks))
            memory[device.device_id] = training_memory(spec, description, parameters=params,
                                                       blocks=description.num_blocks) // 1
    else:  # data, single: full replicas
        for index, device in enumerate(chosen):
            workers.append(WorkerAssignment(rank=index + 1, device_id=device.device_id, dp_index=index,
                                            end_block=description.num_blocks))
            memory[device.device_id] = training_memory(spec, description, parameters=description.parameter_count,
                                                       blocks=description.num_blocks)
    return workers, memory
