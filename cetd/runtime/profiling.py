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
- with `profile_transport`, one message hop over the real tensor transport (mutual TLS, both ends on
  this device): its fixed cost and its cost per byte — what a throttled or slow CPU adds to every
  activation, gradient and all-reduce beyond the network's own time.

Small shapes are dominated by per-operator overhead, not FLOPs; that is why the shapes are the job's
own rather than a reference block scaled by FLOPs. Each piece runs back to back for a while (at least
`SUSTAIN_SECONDS` and `repeats` passes) and its time is the wall time over the passes: the sustained
rate a training step sees. The fastest single pass would not do: a device held to a share of a core (a
CPU quota, thermal or power limits) runs a millisecond's burst at full speed and is throttled only over
longer spans.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from cetd.runtime.models import ModelAdapter, adapter_for, disable_dropout
from cetd.runtime.reference import AdamWSettings, build_adamw
from cetd.runtime.spec import ModelDescription, ShapeTimes
from cetd.runtime.tensor_parallel import make_tensor_parallel_model
from cetd.transport.channel import PeerChannel, TensorKey, TensorSpec

__all__ = ["profile_shape", "profile_transport"]

WARMUP = 2
"""Passes left out before timing (caches, the allocator, lazily built kernels)."""

SUSTAIN_SECONDS = 0.5
"""Least wall time each piece is timed for: several periods of a CFS quota (100 ms) or a governor's window."""


def _one_block_model(description: ModelDescription, dtype: torch.dtype) -> torch.nn.Module:
    config_dict = dict(description.config)
    config_class = type(AutoConfig.for_model(config_dict["model_type"]))
    config = config_class.from_dict(config_dict)
    config.num_hidden_layers = 1  # every family maps this onto its own name (n_layer, n_layers…)
    auto = AutoModelForCausalLM if description.task == "causal_lm" else AutoModelForSequenceClassification
    model: torch.nn.Module = auto.from_config(config, attn_implementation="eager")  # type: ignore[no-untyped-call]
    model = model.to(dtype)
    disable_dropout(model)
    return model


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


def _sustained(run: Callable[[], None], repeats: int, sustain: float) -> float:
    """Seconds per pass of ``run`` over at least ``repeats`` passes and ``sustain`` seconds, after warm-up."""
    for _ in range(WARMUP):
        run()
    passes = 0
    started = time.perf_counter()
    while True:
        run()
        passes += 1
        elapsed = time.perf_counter() - started
        if passes >= repeats and elapsed >= sustain:
            return elapsed / passes


def _unsplittable_block_seconds(model: torch.nn.Module, adapter: ModelAdapter, hidden: torch.Tensor,
                                fields: Mapping[str, torch.Tensor], whole: float, repeats: int, sustain: float) -> float:
    """Per micro-batch, the part of the block's time that does not shrink with its tensor-parallel share:
    the block is timed as one slice of ``ways`` (no all-reduce: only the local work counts here)."""
    ways = min(4, adapter.num_heads())
    if ways < 2:
        return whole
    shard = make_tensor_parallel_model(model, adapter, 0, ways, lambda tensor: tensor).stage

    def run_slice() -> None:
        out = shard.run_blocks(hidden.clone().requires_grad_(True), fields)
        torch.autograd.backward(out, grad_tensors=torch.ones_like(out))

    sliced = _sustained(run_slice, repeats, sustain)
    return min(max((ways * sliced - whole) / (ways - 1), 0.0), whole)


def profile_shape(description: ModelDescription, *, micro_batch: int, seq_len: int,
                  dtype: torch.dtype = torch.float32, repeats: int = 5,
                  sustain: float = SUSTAIN_SECONDS) -> ShapeTimes:
    """Measure ``description``'s block, embedding, head and optimizer step at one micro-batch's shape.

    Raises:
        ValueError: a shape of zero samples or tokens.
    """
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"cannot profile a micro-batch of {micro_batch} × {seq_len} tokens")
    model = _one_block_model(description, dtype)
    adapter = adapter_for(model)
    batch = _batch(description, micro_batch, seq_len)
    embedding = adapter.make_stage(model, 0, 0, first=True, last=False)
    block = adapter.make_stage(model, 0, 1, first=False, last=False)
    head = adapter.make_stage(model, 1, 1, first=False, last=True)
    fields: Mapping[str, torch.Tensor] = {k: v for k, v in batch.items() if k in embedding.batch_keys | block.batch_keys
                                          | head.batch_keys}
    with torch.no_grad():
        hidden = embedding(None, fields).detach()

    def run_block() -> None:
        source = hidden.clone().requires_grad_(True)
        out = block(source, fields)
        out.backward(torch.ones_like(out))

    def run_embedding() -> None:
        out = embedding(None, fields)
        out.backward(torch.ones_like(out))

    def run_head() -> None:
        head(hidden.clone().requires_grad_(True), fields).backward()

    block_time = _sustained(run_block, repeats, sustain)
    fixed = _unsplittable_block_seconds(model, adapter, hidden, fields, block_time, repeats, sustain)
    embedding_time = _sustained(run_embedding, repeats, sustain)
    head_time = _sustained(run_head, repeats, sustain)
    parameters = [p for p in block.parameters() if p.grad is not None]
    optimizer = build_adamw(parameters, AdamWSettings(lr=1e-6))
    count = sum(p.numel() for p in parameters)

    optimizer_time = _sustained(optimizer.step, repeats, sustain)
    return ShapeTimes(
        block_seconds=block_time / micro_batch,
        block_fixed_seconds=fixed,
        embedding_blocks=embedding_time / block_time,
        head_blocks=head_time / block_time,
        optimizer_seconds_per_parameter=optimizer_time / max(count, 1),
    )


def profile_transport(near: PeerChannel, far: PeerChannel, *, repeats: int = 20, sustain: float = SUSTAIN_SECONDS,
                      large: int = 1 << 20, timeout: float = 60.0) -> tuple[float, float]:
    """Seconds per message hop and per byte between two connected channels (ping-pong, both on this device).

    A hop's time here is the sender's and the receiver's CPU work together (plus the loopback), which is
    what two such devices spend between them on one hop; the planner splits it evenly between the ends.
    """
    counter = 0

    def ping_pong(tensor: torch.Tensor) -> None:
        nonlocal counter
        counter += 1
        spec = TensorSpec(dtype=tensor.dtype, shape=tuple(tensor.shape))
        there, back = (TensorKey(step=counter, micro_batch=i, name="profile/hop") for i in (0, 1))
        near.send(far.rank, there, tensor).wait(timeout)
        echo = far.recv(near.rank, there, spec, timeout)
        far.send(near.rank, back, echo).wait(timeout)
        near.recv(far.rank, back, spec, timeout)

    small = torch.zeros(16, dtype=torch.float32)
    big = torch.zeros(large // 4, dtype=torch.float32)
    small_hop = _sustained(lambda: ping_pong(small), repeats, sustain) / 2
    big_hop = _sustained(lambda: ping_pong(big), max(2, repeats // 4), sustain) / 2
    return small_hop, max(big_hop - small_hop, 0.0) / large
