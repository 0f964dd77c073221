"""The benchmark's workload: one GPT-2 model, one data file and the micro-batching every contender trains.

All three contenders (one device, cetd's pipeline, torch.distributed.pipelining) load the very same
``save_pretrained`` folder with `cetd.runtime.models.loading.load_model` (eager attention, no dropout)
and read the very same micro-batches (`cetd.runtime.data.step_batches` of the same data file and
seed), so they train the same function on the same numbers; only the execution differs.

Why a vocabulary of 8192 and not GPT-2's 50257: at 8 × 384 a 50257-token LM head costs as much as
13 blocks (measured: 426 ms against 32 ms per block for a micro-batch of 8 × 32), which would make
the benchmark measure the head alone; with 8192 tokens the head costs about 1.6 blocks, the ≈ 1.4×
heavier last stage (at a 4 / 4 split) that the design notes' anchor measured.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cetd.runtime.data import TokenizedDataset, load_dataset, step_batches, tokenizer_for
from cetd.runtime.models import ModelAdapter
from cetd.runtime.models.loading import load_model
from cetd.runtime.reference import AdamWSettings
from cetd.runtime.spec import JobSpec, Schedule

__all__ = ["LoadedWorkload", "Workload", "load_workload", "write_inputs"]

_WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "house", "big", "small", "red", "blue", "quick", "lazy", "fox", "jumps", "over", "river", "stone", "light", "wind", "morning", "evening", "garden", "kitchen", "window", "table"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """Model shape, batch shape and optimizer: what every contender trains."""

    layers: int = 8
    """Transformer blocks."""
    hidden: int = 384
    """Width of the model (``n_embd``)."""
    heads: int = 6
    """Attention heads (64 dimensions each at 384)."""
    vocab: int = 8192
    """Vocabulary size (see the module docstring for why not 50257)."""
    micro_batch: int = 8
    """Sequences per micro-batch."""
    seq_len: int = 32
    """Tokens per sequence; every text is longer, so no sequence is padded."""
    lr: float = 1e-4
    weight_decay: float = 0.01
    seed: int = 0
    examples: int = 1024
    """Lines in the data file."""

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible into {self.heads} heads")
        if self.vocab < 259:
            raise ValueError("the byte tokenizer needs a vocabulary of at least 259")

    def job_spec(self, folder: Path, data: Path, *, micro_batches: int, steps: int, schedule: Schedule) -> JobSpec:
        """The cetd job that trains this workload with ``micro_batches`` micro-batches per step."""
        return JobSpec(
            model=str(folder),
            data=str(data),
            steps=steps,
            global_batch=self.micro_batch * micro_batches,
            micro_batches=micro_batches,
            seq_len=self.seq_len,
            lr=self.lr,
            weight_decay=self.weight_decay,
            seed=self.seed,
            parallelism="pipeline",
            devices=2,
            schedule=schedule,
        )

    def adamw(self) -> AdamWSettings:
        """The optimizer settings, as `cetd.runtime.worker.adamw_settings` derives them from the job spec."""
        return AdamWSettings(lr=self.lr, weight_decay=self.weight_decay)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def write_inputs(workload: Workload, directory: Path) -> tuple[Path, Path]:
    """Write the model folder (random weights from the seed) and the JSONL data file; return both paths."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = directory / "model"
    config = GPT2Config(
        vocab_size=workload.vocab,
        n_positions=max(64, workload.seq_len),
        n_embd=workload.hidden,
        n_layer=workload.layers,
        n_head=workload.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(workload.seed)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    rng = random.Random(workload.seed)
    lines = []
    for _ in range(workload.examples):
        words: list[str] = []
        while len(" ".join(words)) <= workload.seq_len:  # longer than seq_len bytes: never padded
            words.append(rng.choice(_WORDS))
        lines.append(json.dumps({"text": " ".join(words)}))
    data = directory / "texts.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, data


@dataclass(slots=True)
class LoadedWorkload:
    """The model and tokenized data, loaded as cetd's driver loads them."""

    model: Any
    adapter: ModelAdapter
    dataset: TokenizedDataset

    def step_batches(self, spec: JobSpec, step: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of 0-based ``step``, exactly as the driver feeds them."""
        return step_batches(
            self.dataset, step, global_batch=spec.global_batch, micro_batches=spec.micro_batches, seed=spec.seed
        )


def load_workload(spec: JobSpec) -> LoadedWorkload:
    """Load ``spec``'s model folder and data file (the driver's `describe` does the same)."""
    model, pretrained, adapter = load_model(spec.model, seed=spec.seed)
    dataset = load_dataset(
        Path(spec.data),
        task=adapter.task,
        tokenizer=tokenizer_for(pretrained, model.config),
        seq_len=spec.seq_len,
        max_seq_len=adapter.max_seq_len(),
    )
    if not bool(dataset.tensors["attention_mask"].all()):
        raise ValueError("the benchmark data must not be padded (torch pipelining stages see no mask)")
    return LoadedWorkload(model, adapter, dataset)
