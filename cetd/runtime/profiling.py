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
- with `profile_transport`, one message hop over the real tensor transport (mutual TLS, against an echo
  on another device of the household, or in a second process of this one when none answers): its
  fixed cost and its cost per byte — what a throttled or slow CPU adds to every activation, gradient
  and all-reduce beyond the network's own time.

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

import functools
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from cetd.runtime.models import adapter_for
from cetd.runtime.models.loading import build_described
from cetd.runtime.reference import AdamWSettings, build_adamw
from cetd.runtime.spec import ModelDescription, ShapeTimes
from cetd.runtime.tensor_parallel import make_tensor_parallel_model
from cetd.transport.channel import PeerChannel, TensorKey, TensorSpec

__all__ = ["PhaseCost", "TransportProfile", "cpu_seconds", "echo_transport", "hop_cpu_seconds", "near_hop_seconds",
           "profile_shape", "profile_transport"]

WARMUP = 2
"""Passes left out before timing (caches, the allocator, lazily built kernels)."""

SUSTAIN_SECONDS = 1.0
"""Least wall time each piece is timed for: several periods of a CFS quota (100 ms) or a governor's window."""

WINDOWS = 5
"""Windows each piece's span is cut into; the median window's time per pass is the piece's time."""


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


def _rounds(runs: Mapping[str, Callable[[], None]], repeats: int, sustain: float,
            windows: int = WINDOWS) -> dict[str, list[float]]:
    """Seconds per pass of each of ``runs``, window by window, after warm-up: round after round, one window
    of ``sustain / windows`` seconds of each run, until there were ``windows`` rounds and every run made
    ``repeats`` passes. Returns each run's per-window times, in round order (the same length for all)."""
    for run in runs.values():
        for _ in range(WARMUP):
            run()
    window = sustain / max(windows, 1)
    per_pass: dict[str, list[float]] = {name: [] for name in runs}
    passes = dict.fromkeys(runs, 0)
    done = 0
    while done < windows or min(passes.values(), default=repeats) < repeats:
        for name, run in runs.items():
            count = 0
            started = time.perf_counter()
            while True:
                run()
                count += 1
                elapsed = time.perf_counter() - started
                if elapsed >= window:
                    break
            per_pass[name].append(elapsed / count)
            passes[name] += count
        done += 1
    return per_pass


def _sustained(run: Callable[[], None], repeats: int, sustain: float, windows: int = WINDOWS) -> float:
    """Seconds per pass of ``run``: the median over ``windows`` windows of at least ``sustain / windows``
    seconds each (and ``repeats`` passes in all), after warm-up."""
    return statistics.median(_rounds({"run": run}, repeats, sustain, windows)["run"])


def _median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median of the rounds' ratios (each round's two times were taken seconds apart)."""
    return statistics.median(n / max(d, 1e-12) for n, d in zip(numerators, denominators, strict=True))


def _unsplittable(whole: float, sliced: float, ways: int) -> float:
    """Per micro-batch, the part of a block's time that does not shrink with its tensor-parallel share,
    from the whole block's time and one slice of ``ways``'s: the line through both times."""
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
    model = build_described(description, dtype=dtype, blocks=1)
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
    cpu_before, wall_before = cpu_seconds(), time.perf_counter()
    timed = _rounds(runs, repeats, sustain)
    share = (cpu_seconds() - cpu_before) / max(time.perf_counter() - wall_before, 1e-9)
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


SENTINEL = -1.0
"""A hop's tensor filled with this ends a phase of `echo_transport` (echoed back, like every message)."""


def cpu_seconds() -> float:
    """This process's CPU time so far, every thread's (torch's, gRPC's) included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseCost:
    """One end's CPU over one phase of the transport profile."""

    messages: int
    """Messages this end sent in the phase (as many as it received)."""
    cpu_seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportProfile:
    """What `profile_transport` measured at its end."""

    hop_seconds: float
    """Wall time of one small message's hop (half a ping-pong)."""
    byte_seconds: float
    """Wall time per byte beyond that."""
    large_bytes: int
    """The large phase's message size."""
    phases: dict[str, PhaseCost]
    """This end's CPU per phase."""


WARM_PHASE = "profile/warm"
"""The first ping-pongs, never counted: they open the stream (TLS handshake, gRPC set-up), which is no
message's cost."""
WARM_PASSES = 5


def _phases(large: int) -> dict[str, torch.Tensor]:
    return {WARM_PHASE: torch.zeros(16, dtype=torch.float32),
            "profile/small": torch.zeros(16, dtype=torch.float32),
            "profile/large": torch.zeros(max(large // 4, 16), dtype=torch.float32)}


def profile_transport(near: PeerChannel, far_rank: int, *, repeats: int = 20, sustain: float = SUSTAIN_SECONDS,
                      large: int = 1 << 20, timeout: float = 60.0) -> TransportProfile:
    """Ping-pong with `echo_transport` at ``far_rank`` on this device: a hop's wall time, and this end's CPU.

    Run the echo in another process of this device (as the daemon's profiler does): a hop between two
    devices costs each of them one process's work on a real socket — a message's framing, TLS, gRPC,
    copies and the wake-ups of the threads that carry it. Two channels inside one process share those
    threads and wake-ups, and timed rings across the testbed's hosts at about twice what such a hop
    predicted (`bench.collectives`). `hop_cpu_seconds` turns both ends' CPU into the device's cost.
    """
    counters = dict.fromkeys(_phases(large), 0)

    def ping_pong(name: str, tensor: torch.Tensor) -> None:
        counters[name] += 1
        spec = TensorSpec(dtype=tensor.dtype, shape=tuple(tensor.shape))
        there, back = (TensorKey(step=counters[name], micro_batch=i, name=name) for i in (0, 1))
        near.send(far_rank, there, tensor).wait(timeout)
        near.recv(far_rank, back, spec, timeout)

    hops, phases = {}, {}
    for name, tensor in _phases(large).items():
        if name == WARM_PHASE:
            for _ in range(WARM_PASSES):
                ping_pong(name, tensor)
            ping_pong(name, torch.full_like(tensor, SENTINEL))
            continue
        passes = repeats if name == "profile/small" else max(2, repeats // 4)
        started = cpu_seconds()
        hops[name] = _sustained(functools.partial(ping_pong, name, tensor), passes, sustain) / 2
        ping_pong(name, torch.full_like(tensor, SENTINEL))
        phases[name] = PhaseCost(messages=counters[name], cpu_seconds=cpu_seconds() - started)
    size = _phases(large)["profile/large"].numel() * 4
    small_hop, big_hop = hops["profile/small"], hops["profile/large"]
    return TransportProfile(hop_seconds=small_hop, byte_seconds=max(big_hop - small_hop, 0.0) / size,
                            large_bytes=size, phases=phases)


def echo_transport(far: PeerChannel, near_rank: int, *, large: int = 1 << 20,
                   timeout: float = 60.0) -> dict[str, PhaseCost]:
    """The other end of `profile_transport`: send every message straight back, until each phase's sentinel.

    Returns:
        This end's messages and CPU per phase.
    """
    phases = {}
    for name, tensor in _phases(large).items():
        spec = TensorSpec(dtype=tensor.dtype, shape=tuple(tensor.shape))
        started = cpu_seconds()
        step = 0
        while True:
            step += 1
            message = far.recv(near_rank, TensorKey(step=step, micro_batch=0, name=name), spec, timeout)
            far.send(near_rank, TensorKey(step=step, micro_batch=1, name=name), message).wait(timeout)
            if message.numel() and float(message[0]) == SENTINEL:
                break
        if name != WARM_PHASE:
            phases[name] = PhaseCost(messages=step, cpu_seconds=cpu_seconds() - started)
    return phases


def hop_cpu_seconds(profile: TransportProfile, echo: dict[str, PhaseCost], cpu_share: float) -> tuple[float, float]:
    """Seconds per hop and per byte this device spends on messages, from both ends' CPU.

    A hop's cost is its sender's and its receiver's CPU (each phase: 2 × messages hops, every one
    sent by one end and received by the other), over ``cpu_share``, the CPU-seconds per second this
    device gives a worker (`ShapeTimes.cpu_share`). Unlike a ping-pong's wall time, this does not count
    the wait for a sleeping thread to be scheduled, which swung from run to run by 2× on the testbed's
    shared cores while the rings it stands for took each member's CPU ÷ its share (`bench.collectives`).

    Raises:
        ValueError: the two ends disagree on a phase's messages, or a share that is not positive.
    """
    _check_share(cpu_share)
    per_hop = {}
    for name, near in profile.phases.items():
        far = echo.get(name)
        if far is None or far.messages != near.messages or near.messages < 1:
            raise ValueError(f"the echo answered {far.messages if far else 0} of {near.messages} messages of {name}")
        per_hop[name] = (near.cpu_seconds + far.cpu_seconds) / (2 * near.messages) / cpu_share
    return _split_hop(per_hop, profile.large_bytes)


def near_hop_seconds(profile: TransportProfile, cpu_share: float) -> tuple[float, float]:
    """Seconds per hop and per byte this device spends on messages, from its own end's CPU alone.

    For a profile whose echo ran on another device: each round trip here is one message sent and one
    received, a whole hop's worth of this device's work (`hop_cpu_seconds` averages the two ends when
    both are on this device), over ``cpu_share``. The echo's CPU is its own device's business, as a
    peer's is in a job.

    Raises:
        ValueError: a phase without messages, or a share that is not positive.
    """
    _check_share(cpu_share)
    per_hop = {}
    for name, near in profile.phases.items():
        if near.messages < 1:
            raise ValueError(f"the profile sent no message in {name}")
        per_hop[name] = near.cpu_seconds / near.messages / cpu_share
    return _split_hop(per_hop, profile.large_bytes)


def _check_share(cpu_share: float) -> None:
    if cpu_share <= 0:
        raise ValueError(f"a CPU share of {cpu_share} is no device's")


def _split_hop(per_hop: dict[str, float], large_bytes: int) -> tuple[float, float]:
    """Seconds per hop (the small messages' figure) and per byte (what a large message adds, per byte)."""
    small, big = per_hop["profile/small"], per_hop["profile/large"]
    return small, max(big - small, 0.0) / large_bytes
