"""The tensors of a checkpoint: one worker's shard as safetensors bytes, and the whole model's state.

A worker turns its share into a *shard* (`encode_shard`): its parameters, AdamW's ``exp_avg``,
``exp_avg_sq`` and step count, each keyed by the full Hugging Face parameter name, plus a metadata
record saying where the share sits in its plan (stage, tensor-parallel index and the layout of its
slices, data-parallel index). `read_full_state` rebuilds the whole model's state from a checkpoint's
shards: pipeline stages merge (a tied weight held by two stages is taken once), tensor-parallel slices
are concatenated back (`gather_full_state_dict`), and one intact data-parallel replica of each share is
enough. `optimizer_slices` cuts that state again for any other plan, so a job resumes on a different
number of devices, parallelism or stage split and computes what it would have computed uninterrupted.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from cetd.runtime.checkpoint import CheckpointError, CheckpointManifest, shard_problem
from cetd.runtime.job_protocol import Share, worker_ranks
from cetd.runtime.spec import JobPlan, WorkerAssignment
from cetd.runtime.tensor_parallel import ShardSpec, gather_full_state_dict

__all__ = [
    "FullState",
    "OptimizerSlot",
    "ShardMeta",
    "decode_shard",
    "encode_shard",
    "load_optimizer_state",
    "optimizer_slices",
    "read_full_state",
    "rng_state_text",
    "split_full_tensor",
]

_METADATA_KEY = "cetd"
_KINDS = ("param", "exp_avg", "exp_avg_sq", "step")


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardMeta:
    """Where a shard's share sits in the plan that wrote it (stored in the safetensors header)."""

    step: int
    rank: int
    device_id: str
    stage: int = 0
    tp_index: int = 0
    dp_index: int = 0
    layout: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Tensor-parallel slices: full name → (dimension, parts), as `ShardSpec`; empty for whole tensors."""

    @classmethod
    def for_worker(cls, worker: WorkerAssignment, *, step: int, layout: Mapping[str, ShardSpec] | None) -> ShardMeta:
        """The metadata of ``worker``'s shard at ``step``."""
        return cls(
            step=step,
            rank=worker.rank,
            device_id=worker.device_id,
            stage=worker.stage,
            tp_index=worker.tp_index,
            dp_index=worker.dp_index,
            layout={name: (spec.dim, spec.parts) for name, spec in sorted((layout or {}).items())},
        )


@dataclass(frozen=True, slots=True)
class OptimizerSlot:
    """AdamW's state of one parameter (or of this share's slice of it)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor
    """Scalar float: optimizer steps this parameter took."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FullState:
    """The whole model's training state at a checkpoint, keyed by full parameter names."""

    step: int
    """Optimizer steps done; a resumed run goes on at ``step + 1``."""
    parameters: dict[str, torch.Tensor]
    optimizer: dict[str, OptimizerSlot]
    """AdamW state of every parameter that had one (a parameter that never got a gradient has none)."""
    losses: tuple[float, ...]
    """Loss of steps 1..step."""
    manifest: CheckpointManifest


def rng_state_text() -> str:
    """This process's torch CPU RNG state, base64 (kept in checkpoints for the record)."""
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")


def encode_shard(
    parameters: Iterable[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer, meta: ShardMeta
) -> bytes:
    """A worker's shard: its parameters and their AdamW state by full name, as safetensors bytes.

    The bytes depend only on the tensors and ``meta`` (one metadata entry, sorted JSON), so replicas
    of one share serialize identically.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, parameter in parameters:
        tensors[f"param/{name}"] = parameter.detach().contiguous()
        state = optimizer.state.get(parameter)
        if state:
            tensors[f"exp_avg/{name}"] = state["exp_avg"].detach().contiguous()
            tensors[f"exp_avg_sq/{name}"] = state["exp_avg_sq"].detach().contiguous()
            tensors[f"step/{name}"] = torch.as_tensor(state["step"], dtype=torch.float64).reshape(())
    record = {
        "step": meta.step,
        "rank": meta.rank,
        "device_id": meta.device_id,
        "stage": meta.stage,
        "tp_index": meta.tp_index,
        "dp_index": meta.dp_index,
        "layout": {name: list(value) for name, value in meta.layout.items()},
        "rng_torch": rng_state_text(),
    }
    return save_safetensors(tensors, metadata={_METADATA_KEY: json.dumps(record, sort_keys=True)})


def decode_shard(data: bytes) -> tuple[ShardMeta, dict[str, dict[str, torch.Tensor]]]:
    """Parse `encode_shard`'s bytes into the metadata and ``{kind: {full name: tensor}}`` (kinds:
    ``param``, ``exp_avg``, ``exp_avg_sq``, ``step``).

    Raises:
        CheckpointError: the bytes are not a cetd shard.
    """
    try:
        (header_size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_size])
        record = json.loads(header["__metadata__"][_METADATA_KEY])
        meta = ShardMeta(
            step=int(record["step"]),
            rank=int(record["rank"]),
            device_id=str(record["device_id"]),
            stage=int(record["stage"]),
            tp_index=int(record["tp_index"]),
            dp_index=int(record["dp_index"]),
            layout={str(name): (int(dim), int(parts)) for name, (dim, parts) in record["layout"].items()},
        )
        flat = load_safetensors(data)
    except Exception as error:  # safetensors raises its own SafetensorError on malformed bytes
        raise CheckpointError(f"not a cetd checkpoint shard: {error}") from None
    tensors: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in _KINDS}
    for key, tensor in flat.items():
        kind, _, name = key.partition("/")
        if kind in tensors:
            tensors[kind][name] = tensor
    return meta, tensors


def read_full_state(manifest: CheckpointManifest, folder: Path) -> FullState:
    """Rebuild the whole model's state from the checkpoint in ``folder`` (see `load_full_state`).

    Each share needs one intact shard: a data-parallel replica stands in for a corrupt one.

    Raises:
        CheckpointError: some share has no intact shard, or the shards disagree with the manifest.
    """
    chosen: dict[tuple[int, int], tuple[ShardMeta, dict[str, dict[str, torch.Tensor]]]] = {}
    problems: list[str] = []
    for entry in sorted(manifest.shards, key=lambda e: _position(manifest.plan, e.rank)):
        worker = manifest.plan.worker(entry.rank)
        slot = (worker.stage, worker.tp_index)
        if slot in chosen:
            continue
        problem = shard_problem(folder, entry)
        if problem is not None:
            problems.append(problem)
            continue
        meta, tensors = decode_shard((folder / entry.file).read_bytes())
        if meta.step != manifest.step or meta.rank != entry.rank:
            problems.append(f"{entry.file} holds rank {meta.rank} at step {meta.step}")
            continue
        chosen[slot] = (meta, tensors)
    expected = {(w.stage, w.tp_index) for w in manifest.plan.workers}
    if set(chosen) != expected:
        raise CheckpointError(f"checkpoint at step {manifest.step} in {folder} cannot be loaded: {'; '.join(problems)}")
    merged: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in _KINDS}
    for stage in sorted({stage for stage, _ in chosen}):
        group = [chosen[slot] for slot in sorted(chosen) if slot[0] == stage]
        layout = {name: ShardSpec(dim, parts) for name, (dim, parts) in group[0][0].layout.items()}
        for kind in _KINDS:
            pieces = [tensors[kind] for _, tensors in group]
            whole = gather_full_state_dict(pieces, layout if kind in ("param", "exp_avg", "exp_avg_sq") else {})
            for name, tensor in whole.items():
                merged[kind].setdefault(name, tensor)  # a tied weight: the first stage's copy
    optimizer = {
        name: OptimizerSlot(exp_avg, merged["exp_avg_sq"][name], merged["step"][name])
        for name, exp_avg in merged["exp_avg"].items()
    }
    return FullState(
        step=manifest.step,
        parameters=merged["param"],
        optimizer=optimizer,
        losses=manifest.losses,
        manifest=manifest,
    )


def _position(plan: JobPlan, rank: int) -> tuple[int, int, int]:
    worker = plan.worker(rank)
    return worker.dp_index, worker.stage, worker.tp_index


def split_full_tensor(full: torch.Tensor, spec: ShardSpec, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Cut a full tensor into tensor-parallel slices of ``sizes`` along ``spec.dim`` (the inverse of
    `gather_full_state_dict`); a fused query/key/value tensor is cut in each of its thirds."""
    if spec.parts == 1:
        return [piece.clone() for piece in torch.split(full, list(sizes), dim=spec.dim)]
    part_sizes = [size // spec.parts for size in sizes]
    parts = [torch.split(part, part_sizes, dim=spec.dim) for part in full.chunk(spec.parts, dim=spec.dim)]
    return [torch.cat([part[rank] for part in parts], dim=spec.dim) for rank in range(len(sizes))]


def optimizer_slices(
    state: FullState, plan: JobPlan, shares: Mapping[int, Share]
) -> dict[int, dict[str, OptimizerSlot]]:
    """Each worker's AdamW state under ``plan``, cut from the whole model's state like its parameters.

    A parameter without a saved state gets zeros and step 0: exactly the state AdamW creates for it at
    its first step, so leaving it out would compute the same.
    """
    slices: dict[int, dict[str, OptimizerSlot]] = {}
    for rank in worker_ranks(plan):
        share = shares[rank]
        worker = plan.worker(rank)
        group = sorted(
            (w for w in plan.workers if w.stage == worker.stage and w.dp_index == worker.dp_index),
            key=lambda w: w.tp_index,
        )
        own: dict[str, OptimizerSlot] = {}
        for name, spec in share.parameter_specs().items():
            saved = state.optimizer.get(name)
            if saved is None:
                zeros = torch.zeros(spec.shape, dtype=spec.dtype)
                own[name] = OptimizerSlot(zeros, zeros.clone(), torch.zeros((), dtype=torch.float64))
                continue
            cut = (share.layout or {}).get(name)
            if cut is None:
                own[name] = saved
                continue
            sizes = [shares[w.rank].parameter_specs()[name].shape[cut.dim] for w in group]
            index = [w.rank for w in group].index(rank)
            own[name] = OptimizerSlot(
                split_full_tensor(saved.exp_avg, cut, sizes)[index],
                split_full_tensor(saved.exp_avg_sq, cut, sizes)[index],
                saved.step,
            )
        slices[rank] = own
    return slices


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[tuple[str, nn.Parameter]],
    slots: Mapping[str, OptimizerSlot],
) -> None:
    """Give each parameter its saved AdamW state, as AdamW itself would hold it after those steps."""
    # AdamW keeps its step count as a float tensor of this dtype (float32 unless the default is float64).
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for name, parameter in parameters:
        slot = slots[name]
        if float(slot.step) == 0.0 and not bool(slot.exp_avg.any()) and not bool(slot.exp_avg_sq.any()):
            optimizer.state.pop(parameter, None)  # untouched: AdamW creates the very same state lazily
            continue
        optimizer.state[parameter] = {
            "step": torch.tensor(float(slot.step), dtype=step_dtype),
            "exp_avg": slot.exp_avg.to(parameter.dtype).clone(memory_format=torch.contiguous_format),
            "exp_avg_sq": slot.exp_avg_sq.to(parameter.dtype).clone(memory_format=torch.contiguous_format),
        }
