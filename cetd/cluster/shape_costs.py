"""What a model at a job's shape costs, apart from any device: its parameters per part (blocks, embedding,
head), the bytes of its activations, the embedding's and head's extra load in blocks, and a worker's
peak memory (runtime, weights, gradients, AdamW's moments and the activations its schedule keeps).

`cetd.cluster.cost_model` prices these on devices; the planner checks every share's memory with
`stage_memory` before it times anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cetd.cluster.device_offer import DeviceOffer
from cetd.runtime.spec import JobSpec, ModelDescription

__all__ = [
    "EMBEDDING_BLOCKS",
    "HEAD_EFFICIENCY",
    "OPTIMIZER_COPIES",
    "RUNTIME_OVERHEAD_BYTES",
    "ModelCosts",
    "activation_bytes",
    "bytes_per_number",
    "in_flight",
    "measured_costs",
    "model_costs",
    "stage_memory",
    "training_memory",
]

RUNTIME_OVERHEAD_BYTES = 400 * 1024**2
"""Resident memory of a worker before any model: Python, torch, grpc (measured: ~350 MB here)."""

OPTIMIZER_COPIES = 4
"""Weights, gradients and AdamW's two moments: four numbers per parameter."""

HEAD_EFFICIENCY = 1.0
"""A head's matrix product (and its loss) costs this many blocks per block's worth of parameters.
Measured here (bench/planner, bench/pipeline: GPT-2 × 384): with a vocabulary of 8192 the head has 1.77×
a block's parameters and cost 1.6–1.8 blocks (0.92–1.02 per parameter ratio); with 50257 it has ≈ 11× and
cost ≈ 13 blocks (≈ 1.2). An earlier value of 0.15 came from mixing those two vocabularies and made the
head look free, so the planner put it on slow devices."""

EMBEDDING_BLOCKS = 0.05
"""An embedding lookup and its scattered gradient, in blocks (when no device measured it)."""


def bytes_per_number(spec: JobSpec) -> int:
    return 8 if spec.precision == "float64" else 4


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelCosts:
    """What the cost model needs of a model at the job's shape."""

    number_bytes: int
    block_parameters: int
    first_parameters: int
    """Embedding parameters (on the first stage)."""
    last_parameters: int
    """Head parameters (on the last stage; a tied embedding counts again there, as it is held twice)."""
    ends_parameters: int
    """Everything outside the blocks, each tensor once."""
    embedding_blocks: float
    """Extra load of the embedding, in blocks."""
    head_blocks: float
    """Extra load of the head and loss, in blocks."""
    boundary_bytes_per_sample: int
    """One activation between blocks (and its gradient) per sample: seq × hidden numbers."""
    block_activation_bytes_per_sample: int
    """What one block keeps for backward per sample."""
    head_activation_bytes_per_sample: int
    """What the head keeps per sample (logits in float32 with their gradients, for a language model)."""


def model_costs(spec: JobSpec, description: ModelDescription, *, embedding_blocks: float | None = None,
                head_blocks: float | None = None) -> ModelCosts:
    """`ModelCosts` of ``description`` at ``spec``'s shape; the two extra loads may be given (measured)."""
    number = bytes_per_number(spec)
    hidden, seq = description.hidden_size, spec.seq_len
    ends = max(0, description.parameter_count - description.num_blocks * description.block_parameter_count)
    config = description.config
    if description.task == "causal_lm":
        vocab = int(config.get("vocab_size", 0) or 0)
        head = min(vocab * hidden, ends) if vocab else ends // 2
        tied = bool(config.get("tie_word_embeddings", True))
        first = ends if tied else ends - head
        logits = seq * vocab * 4 * 3  # float32 logits, their softmax and their gradient
    else:
        labels = int(config.get("num_labels", 2) or 2)
        head = min(hidden * hidden + hidden + hidden * labels + labels, ends)
        first = ends - head
        logits = 0
    block = max(description.block_parameter_count, 1)
    if head_blocks is None:
        head_blocks = max(EMBEDDING_BLOCKS, HEAD_EFFICIENCY * head / block)
    per_block = seq * (16 * hidden + 2 * description.num_heads * seq) * number
    return ModelCosts(
        number_bytes=number, block_parameters=description.block_parameter_count, first_parameters=first,
        last_parameters=head, ends_parameters=ends,
        embedding_blocks=EMBEDDING_BLOCKS if embedding_blocks is None else embedding_blocks,
        head_blocks=head_blocks, boundary_bytes_per_sample=seq * hidden * number,
        block_activation_bytes_per_sample=per_block, head_activation_bytes_per_sample=logits,
    )


def measured_costs(spec: JobSpec, description: ModelDescription, offers: Sequence[DeviceOffer]) -> ModelCosts:
    """`model_costs` with the embedding's and head's loads that the offers measured (their median), where any did."""

    def median(values: list[float]) -> float | None:
        values = sorted(values)
        return values[len(values) // 2] if values else None

    return model_costs(spec, description,
                       embedding_blocks=median([o.embedding_blocks for o in offers if o.embedding_blocks is not None]),
                       head_blocks=median([o.head_blocks for o in offers if o.head_blocks is not None]))


def activation_bytes(spec: JobSpec, description: ModelDescription, blocks: int) -> int:
    """Activations of ``blocks`` blocks for all of a step's micro-batches (the conservative bound)."""
    costs = model_costs(spec, description)
    micro = max(1, spec.global_batch // spec.micro_batches)
    return costs.block_activation_bytes_per_sample * micro * max(blocks, 1) * spec.micro_batches


def training_memory(spec: JobSpec, description: ModelDescription, *, parameters: int, blocks: int,
                    in_flight: int | None = None) -> int:
    """Predicted peak memory of a worker holding ``parameters`` parameters and ``blocks`` blocks.

    ``in_flight``: micro-batches whose activations it keeps at once (None: all of the step's, the bound).
    """
    micro = max(1, spec.global_batch // spec.micro_batches)
    kept = spec.micro_batches if in_flight is None else max(1, in_flight)
    costs = model_costs(spec, description)
    state = parameters * costs.number_bytes * OPTIMIZER_COPIES
    return RUNTIME_OVERHEAD_BYTES + state + costs.block_activation_bytes_per_sample * micro * max(blocks, 1) * kept


def stage_memory(spec: JobSpec, costs: ModelCosts, *, blocks: int, first: bool, last: bool, in_flight: int,
                 tensor_ways: int = 1) -> int:
    """Peak memory of one worker: runtime, 4 copies of its parameters, the activations it keeps."""
    micro = max(1, spec.global_batch // spec.micro_batches)
    parameters = blocks * costs.block_parameters // tensor_ways
    if first and last:
        parameters += costs.ends_parameters
    elif first:
        parameters += costs.first_parameters
    elif last:
        parameters += costs.last_parameters
    activations = costs.block_activation_bytes_per_sample * max(blocks, 1)
    if last:
        activations += costs.head_activation_bytes_per_sample
    state = parameters * costs.number_bytes * OPTIMIZER_COPIES
    return RUNTIME_OVERHEAD_BYTES + state + activations * micro * max(1, in_flight)


def in_flight(spec: JobSpec, stage: int, stages: int) -> int:
    """Micro-batches whose activations stage ``stage`` keeps: GPipe all M, 1F1B at most S − s."""
    if spec.schedule == "gpipe":
        return spec.micro_batches
    return min(spec.micro_batches, stages - stage)
