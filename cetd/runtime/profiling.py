"""Time a model's own layers on this device: what the planner's cost model needs, measured.

Runs in a job process (`cetd.daemon.worker_main`, role ``profile``), with the thread count a worker of
this device would use. The model is built from its described config with one block, so profiling a
model that does not fit this device (a GPT-2 large on a 4 GB board) costs one block's memory, not the
model's. The measured pieces, each at the job's micro-batch and sequence length, forward + backward:

- one transformer block (the planner's unit of work), whole and as one tensor-parallel slice: the line
  through both times tells what part of a block's time no split makes smaller (operator overhead,
  norms, residuals), which the planner keeps whole on every tensor-parallel device;
- the embedding (first stage) and the head with its loss (last stage), each as a multiple of a block;
- one AdamW step, per parameter (it grows with the share's parameters, not with the batch);
- then, in the same process, what one message costs (`cetd.runtime.transport_profile`).

Small shapes are dominated by per-operator overhead, not FLOPs; that is why the shapes are the job's
own rather than a reference block scaled by FLOPs. Each piece runs back to back for a while (at least
`SUSTAIN_SECONDS` and `repeats` passes), cut into `WINDOWS` windows; its time is the median window's
wall time per pass: the sustained rate a training step sees. The fastest single pass would not do: a
device held to a share of a core (a CPU quota, thermal or power limits) runs a millisecond's burst at
full speed and is throttled only over longer spans. One mean over the whole span would not do either:
a burst of other work on the device (another process starting, a neighbour's measurement on a shared
machine) lands in one or two windows and would skew the mean; the median leaves it out.

The pieces' windows are taken in rounds (one window of each piece per round), and what is a ratio of
two pieces — the embedding's and the head's cost in blocks, the block's unsplittable part — is the
median of each round's ratio. A device's speed also shifts for seconds at a time: at a fifth of a core
on this project's 2-core VM, one block's pass took 42 ms for a whole 5-second profile and 30 ms in the
next two, and timing the whole block first and its slice after it had put that block's unsplittable
part at 16 ms in one profile and 10 ms in the next. Pieces timed side by side see the same speed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from cetd.runtime.models import adapter_for
from cetd.runtime.models.loading import build_described
from cetd.runtime.reference import AdamWSettings, build_adamw
from cetd.runtime.spec import ModelDescription, ShapeTimes
from cetd.runtime.tensor_parallel import make_tensor_parallel_model
from cetd.runtime.timing import SUSTAIN_SECONDS, cpu_seconds, rounds

__all__ = ["profile_shape", "time_block"]

def _batch(description: ModelDescription, micro_batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    vocab = int(description.config.get("vocab_size", 256) or 256)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    if description.task == "causal_lm":
        batch["labels"] = ids.clone()
    else:
        labels = int(description.config.get("num_labels", 2) or 2)
        batch["labels"] = torch.randint(0, labels, (micro_batch,), generator=generator)
    return batch


def _median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median of the rounds' ratios (each round's two times were taken seconds apart)."""
    return statistics.median(n / max(d, 1e-12) for n, d in zip(numerators, denominators, strict=True))


def _unsplittable(whole: float, sliced: float, ways: int) -> float:
    """Per micro-batch, the part of a block's time that does not shrink with its tensor-parallel share,
    from the whole block's time and one slice of ``ways``'s: the line through both times."""
    return min(max((ways * sliced - whole) / (ways - 1), 0.0), whole)


class _Pieces:
    """A one-block copy of the described model cut into its embedding, block and head, with one micro-batch's
    fields and the block's input."""

    def __init__(self, description: ModelDescription, micro_batch: int, seq_len: int, dtype: torch.dtype) -> None:
        if micro_batch < 1 or seq_len < 1:
            raise ValueError(f"cannot profile a micro-batch of {micro_batch} × {seq_len} tokens")
        self.model = build_described(description, dtype=dtype, blocks=1)
        self.adapter = adapter_for(self.model)
        batch = _batch(description, micro_batch, seq_len)
        self.embedding = self.adapter.make_stage(self.model, 0, 0, first=True, last=False)
        self.block = self.adapter.make_stage(self.model, 0, 1, first=False, last=False)
        self.head = self.adapter.make_stage(self.model, 1, 1, first=False, last=True)
        keys = self.embedding.batch_keys | self.block.batch_keys | self.head.batch_keys
        self.fields: Mapping[str, torch.Tensor] = {k: v for k, v in batch.items() if k in keys}
        with torch.no_grad():
            self.hidden = self.embedding(None, self.fields).detach()

    def run_block(self) -> None:
        source = self.hidden.clone().requires_grad_(True)
        out = self.block(source, self.fields)
        out.backward(torch.ones_like(out))


def time_block(description: ModelDescription, *, micro_batch: int, seq_len: int,
               dtype: torch.dtype = torch.float32, repeats: int = 5,
               sustain: float = SUSTAIN_SECONDS) -> tuple[float, float]:
    """Time ``description``'s block alone, as `profile_shape` times it: seconds per sample, and the CPU share
    the device gave it meanwhile. A shape's block timed again minutes after its profile
    (`cetd.daemon.shape_profiles`).

    Raises:
        ValueError: a shape of zero samples or tokens.
    """
    pieces = _Pieces(description, micro_batch, seq_len, dtype)
    timed, share = _rounds_and_share({"block": pieces.run_block}, repeats, sustain)
    return statistics.median(timed["block"]) / micro_batch, share


def _rounds_and_share(runs: Mapping[str, Callable[[], None]], repeats: int,
                      sustain: float) -> tuple[dict[str, list[float]], float]:
    """`rounds`, and the CPU-seconds per wall second this process had meanwhile."""
    cpu_before, wall_before = cpu_seconds(), time.perf_counter()
    timed = rounds(runs, repeats, sustain)
    return timed, (cpu_seconds() - cpu_before) / max(time.perf_counter() - wall_before, 1e-9)


def profile_shape(description: ModelDescription, *, micro_batch: int, seq_len: int,
                  dtype: torch.dtype = torch.float32, repeats: int = 5,
                  sustain: float = SUSTAIN_SECONDS) -> ShapeTimes:
    """Measure ``description``'s block, embedding, head and optimizer step at one micro-batch's shape.

    Raises:
        ValueError: a shape of zero samples or tokens.
    """
    pieces = _Pieces(description, micro_batch, seq_len, dtype)
    model, adapter, fields, hidden = pieces.model, pieces.adapter, pieces.fields, pieces.hidden
    embedding, block, head, run_block = pieces.embedding, pieces.block, pieces.head, pieces.run_block

    def run_embedding() -> None:
        out = embedding(None, fields)
        out.backward(torch.ones_like(out))

    def run_head() -> None:
        head(hidden.clone().requires_grad_(True), fields).backward()

    run_block()  # the block's parameters get their gradients: the optimizer steps over those
    parameters = [p for p in block.parameters() if p.grad is not None]
    optimizer = build_adamw(parameters, AdamWSettings(lr=1e-6))
    count = sum(p.numel() for p in parameters)
    runs: dict[str, Callable[[], None]] = {"block": run_block, "embedding": run_embedding, "head": run_head,
                                           "optimizer": optimizer.step}
    # The unsplittable part: the block is also timed as one tensor-parallel slice of ``ways`` (no all-reduce:
    # only the local work counts here).
    ways = min(4, adapter.num_heads())
    if ways >= 2:
        shard = make_tensor_parallel_model(model, adapter, 0, ways, lambda tensor: tensor).stage

        def run_slice() -> None:
            out = shard.run_blocks(hidden.clone().requires_grad_(True), fields)
            torch.autograd.backward(out, grad_tensors=torch.ones_like(out))

        runs["slice"] = run_slice
    timed, share = _rounds_and_share(runs, repeats, sustain)
    whole = timed["block"]
    block_time = statistics.median(whole)
    fixed = (statistics.median(_unsplittable(w, s, ways) for w, s in zip(whole, timed["slice"], strict=True))
             if "slice" in timed else block_time)
    return ShapeTimes(
        block_seconds=block_time / micro_batch,
        block_fixed_seconds=fixed,
        embedding_blocks=_median_ratio(timed["embedding"], whole),
        head_blocks=_median_ratio(timed["head"], whole),
        optimizer_seconds_per_parameter=statistics.median(timed["optimizer"]) / max(count, 1),
        cpu_share=share,
    )
