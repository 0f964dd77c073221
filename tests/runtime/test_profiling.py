"""Profiling a model's own shapes: one block of the model, timed at the job's micro-batch."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cetd.runtime import timing
from cetd.runtime.driver import Driver
from cetd.runtime.models.loading import build_described
from cetd.runtime.profiling import _median_ratio, _unsplittable, profile_shape, time_block
from cetd.runtime.spec import JobSpec, ModelDescription
from cetd.runtime.timing import rounds, sustained
from cetd.runtime.transport_profile import (
    PhaseCost,
    TransportProfile,
    echo_transport,
    hop_cpu_seconds,
    near_hop_seconds,
    profile_transport,
)


def _describe(tmp_path: Path, model: str) -> ModelDescription:
    data = tmp_path / "data.jsonl"
    if model == "minilm":
        data.write_text("".join(json.dumps({"question": f"q {i}", "sentence": f"s {i}", "label": i % 2}) + "\n"
                                for i in range(8)))
    else:
        data.write_text("".join(json.dumps({"text": f"some words {i}"}) + "\n" for i in range(8)))
    return Driver(JobSpec(model=model, data=str(data), seq_len=16)).describe()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", ["gpt2-tiny", "minilm"])
def test_every_piece_is_timed_at_the_jobs_shape(tmp_path: Path, model: str) -> None:
    description = _describe(tmp_path, model)
    times = profile_shape(description, micro_batch=2, seq_len=16, repeats=2, sustain=0.05)
    for value in (times.block_seconds, times.embedding_blocks, times.head_blocks,
                  times.optimizer_seconds_per_parameter):
        assert math.isfinite(value)
        assert value > 0
    assert times.block_seconds < 1.0  # one tiny block, per sample, on a CPU core
    assert 0 < times.cpu_share <= 1.5  # one thread: at most about a core's worth per second
    # The block timed again alone, as the daemon does minutes later: the same piece, per sample.
    block, share = time_block(description, micro_batch=2, seq_len=16, repeats=2, sustain=0.05)
    assert math.isfinite(block)
    assert 0 < block < 1.0
    assert 0 < share <= 1.5


@pytest.mark.timeout(120)
def test_only_one_block_is_built_whatever_the_models_depth(tmp_path: Path) -> None:
    description = _describe(tmp_path, "gpt2-tiny")
    deep = ModelDescription(**{**_fields(description), "num_blocks": 48,
                               "config": {**description.config, "n_layer": 48}})
    model = build_described(deep, dtype=torch.float32, blocks=1)
    ends = description.parameter_count - description.num_blocks * description.block_parameter_count
    assert sum(p.numel() for p in model.parameters()) == ends + description.block_parameter_count


def test_an_empty_shape_is_refused(tmp_path: Path) -> None:
    description = _describe(tmp_path, "gpt2-tiny")
    with pytest.raises(ValueError, match="cannot profile a micro-batch of 0"):
        profile_shape(description, micro_batch=0, seq_len=16)
    with pytest.raises(ValueError, match="cannot profile a micro-batch of 2 × 0 tokens"):
        time_block(description, micro_batch=2, seq_len=0)


def _fields(description: ModelDescription) -> dict[str, object]:
    return {name: getattr(description, name) for name in description.__dataclass_fields__}


@pytest.mark.timeout(60)
def test_a_hop_is_timed_against_the_echo_and_every_message_is_consumed() -> None:
    import threading

    from cetd.runtime.local_channel import make_local_channels

    near, far = make_local_channels(2)
    echoed: list[dict[str, PhaseCost]] = []
    echo = threading.Thread(target=lambda: echoed.append(echo_transport(far, 0, large=1 << 16)))
    echo.start()
    timed = profile_transport(near, 1, repeats=3, sustain=0.02, large=1 << 16)
    echo.join(timeout=30)
    assert timed.hop_seconds > 0
    assert timed.byte_seconds >= 0
    assert timed.large_bytes == 1 << 16
    assert len(echoed) == 1
    # The warm-up that opens the stream is not counted.
    assert set(timed.phases) == set(echoed[0]) == {"profile/small", "profile/large"}
    for phase, cost in timed.phases.items():
        # Every ping the near end sent was echoed: the timed passes (at least one per window), the warm-up,
        # and the sentinel that ends the phase.
        assert echoed[0][phase].messages == cost.messages >= timing.WINDOWS + timing.WARMUP + 1
        assert cost.cpu_seconds > 0
    assert near.undelivered() == []
    assert far.undelivered() == []


def test_a_hops_cost_is_both_ends_cpu_over_the_devices_share() -> None:
    near = TransportProfile(hop_seconds=9.0, byte_seconds=9.0, large_bytes=1000, phases={
        "profile/small": PhaseCost(messages=100, cpu_seconds=0.030),
        "profile/large": PhaseCost(messages=10, cpu_seconds=0.010)})
    far = {"profile/small": PhaseCost(messages=100, cpu_seconds=0.030),
           "profile/large": PhaseCost(messages=10, cpu_seconds=0.014)}
    message, per_byte = hop_cpu_seconds(near, far, cpu_share=0.5)
    assert message == pytest.approx(0.060 / 200 / 0.5)  # 0.6 ms: 0.3 ms of CPU at half a core
    assert per_byte == pytest.approx((0.024 / 20 / 0.5 - message) / 1000)
    with pytest.raises(ValueError, match="answered 9 of 10 messages of profile/large"):
        hop_cpu_seconds(near, {**far, "profile/large": PhaseCost(messages=9, cpu_seconds=0.014)}, cpu_share=0.5)
    with pytest.raises(ValueError, match="no device's"):
        hop_cpu_seconds(near, far, cpu_share=0.0)


def test_against_an_echo_on_another_device_a_hops_cost_is_this_ends_cpu_alone() -> None:
    # Each round trip here sends one message and receives one: a whole hop's work on this device. The
    # echo's CPU (on its own device) is not this device's.
    near = TransportProfile(hop_seconds=9.0, byte_seconds=9.0, large_bytes=1000, phases={
        "profile/small": PhaseCost(messages=100, cpu_seconds=0.030),
        "profile/large": PhaseCost(messages=10, cpu_seconds=0.010)})
    message, per_byte = near_hop_seconds(near, cpu_share=0.5)
    assert message == pytest.approx(0.030 / 100 / 0.5)  # 0.6 ms: 0.3 ms of CPU at half a core
    assert per_byte == pytest.approx((0.010 / 10 / 0.5 - message) / 1000)
    with pytest.raises(ValueError, match="no device's"):
        near_hop_seconds(near, cpu_share=0.0)
    silent = TransportProfile(hop_seconds=9.0, byte_seconds=9.0, large_bytes=1000, phases={
        "profile/small": PhaseCost(messages=0, cpu_seconds=0.0), "profile/large": PhaseCost(messages=10, cpu_seconds=0.01)})
    with pytest.raises(ValueError, match="sent no message in profile/small"):
        near_hop_seconds(silent, cpu_share=0.5)


class _Clock:
    """A fake `time.perf_counter` that only the timed pass moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_other_work_in_one_window_does_not_skew_the_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    passes = 0

    def run() -> None:  # 10 ms a pass, but passes 30..32 take 100 ms each (a neighbour's burst)
        nonlocal passes
        passes += 1
        clock.now += 0.100 if 30 <= passes < 33 else 0.010

    seconds = sustained(run, repeats=5, sustain=1.0, windows=5)
    assert seconds == pytest.approx(0.010)
    timed = passes - timing.WARMUP
    mean = (timed * 0.010 + 3 * 0.090) / timed
    assert mean > 0.012  # the whole span's mean would have been more than 20% slow


def test_sustained_times_at_least_the_span_and_the_passes_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    passes = 0

    def run() -> None:
        nonlocal passes
        passes += 1
        clock.now += 0.5  # a pass longer than a window: each window holds one

    assert sustained(run, repeats=7, sustain=1.0, windows=3) == pytest.approx(0.5)
    assert passes == timing.WARMUP + 7


def test_pieces_timed_in_rounds_keep_their_ratio_when_the_device_slows_down(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)

    def piece(seconds: float) -> Callable[[], None]:
        def run() -> None:  # after 1.05 s the device runs 1.5× slower, to the end of the profile
            clock.now += seconds * (1.5 if clock.now >= 1.05 else 1.0)
        return run

    timed = rounds({"block": piece(0.010), "head": piece(0.005)}, repeats=5, sustain=1.0, windows=6)
    assert len(timed["block"]) == len(timed["head"]) == 6
    assert _median_ratio(timed["head"], timed["block"]) == pytest.approx(0.5)
    # Timed one after the other, the head would have met only the slow device: 0.75 blocks, not 0.5.
    clock.now = 0.0
    block = sustained(piece(0.010), repeats=5, sustain=1.0, windows=6)
    head = sustained(piece(0.005), repeats=5, sustain=1.0, windows=6)
    assert head / block == pytest.approx(0.75)


def test_the_unsplittable_part_is_the_line_through_the_whole_and_a_slice() -> None:
    assert _unsplittable(whole=8.0, sliced=3.0, ways=4) == pytest.approx(4 / 3)  # 4/3 + (8 - 4/3) / 4 = 3
    assert _unsplittable(whole=8.0, sliced=1.0, ways=4) == 0.0  # a slice faster than its share: nothing fixed
    assert _unsplittable(whole=8.0, sliced=9.0, ways=4) == 8.0  # never more than the whole block
