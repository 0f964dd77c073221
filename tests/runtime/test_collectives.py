"""Collectives over the in-process channel: exact sums, bit-identical ranks, key isolation, and the
channel's own checks (dtype/shape mismatches, timeouts, failing peers)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta

import pytest
import torch

from cetd.runtime.collectives import (
    RING_MIN_BYTES,
    all_gather,
    all_reduce_,
    all_reduce_coalesced_,
    broadcast_,
    broadcast_coalesced_,
    plan_buckets,
)
from cetd.runtime.local_channel import LocalPeerChannel, make_local_channels, run_on_local_ranks
from cetd.transport.channel import PeerChannel, TensorKey, TensorSpec, TransportError

torch.set_num_threads(1)

KEY = TensorKey(step=3, micro_batch=-1, name="test")


def rank_tensor(rank: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values whose float sums round differently depending on the order of addition."""
    generator = torch.Generator().manual_seed(1000 + rank)
    values = torch.randn(*shape, generator=generator, dtype=torch.float64) * 10.0 ** (rank % 3)
    return values.to(dtype)


@pytest.mark.timeout(30)
def test_local_channel_satisfies_the_protocol_and_clones_on_send() -> None:
    sender, receiver = make_local_channels(2)
    channel: PeerChannel = sender
    tensor = torch.arange(4.0)
    channel.send(1, KEY, tensor).wait()
    tensor.add_(100)  # the wire already has its own copy
    received = receiver.recv(0, KEY, TensorSpec(dtype=torch.float32, shape=(4,)), timeout=1)
    assert received.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert sender.bytes_sent == 16
    assert sender.undelivered() == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (TensorSpec(dtype=torch.float64, shape=(4,)), "float64"),
        (TensorSpec(dtype=torch.float32, shape=(2, 2)), "[2, 2]"),
    ],
)
def test_recv_refuses_another_dtype_or_shape(spec: TensorSpec, words: str) -> None:
    sender, receiver = make_local_channels(2)
    sender.send(1, KEY, torch.zeros(4))
    with pytest.raises(TransportError, match="expected") as caught:
        receiver.recv(0, KEY, spec, timeout=1)
    assert words in str(caught.value)
    assert "float32 [4]" in str(caught.value)


@pytest.mark.timeout(30)
def test_recv_times_out_and_a_duplicate_key_is_refused() -> None:
    sender, receiver = make_local_channels(2)
    started = time.monotonic()
    with pytest.raises(TransportError, match="nothing came"):
        receiver.recv(0, KEY, TensorSpec(dtype=torch.float32, shape=(1,)), timeout=0.05)
    assert 0.04 < time.monotonic() - started < 2
    sender.send(1, KEY, torch.zeros(1))
    with pytest.raises(TransportError, match="twice"):
        sender.send(1, KEY, torch.zeros(1))
    with pytest.raises(ValueError, match="cannot address"):
        sender.send(0, KEY, torch.zeros(1))


@pytest.mark.timeout(30)
def test_a_failing_rank_releases_its_waiting_peers_at_once() -> None:
    def body(channel: LocalPeerChannel) -> None:
        if channel.rank == 1:
            raise RuntimeError("out of memory")
        channel.recv(1, KEY, TensorSpec(dtype=torch.float32, shape=(1,)), timeout=30)

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="out of memory"):
        run_on_local_ranks(3, body)
    assert time.monotonic() - started < 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("numel", [7, 50_003])  # direct path and ring path (not divisible by world)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_reduce_is_the_sum_and_bit_identical_on_every_rank(world: int, numel: int, dtype: torch.dtype) -> None:
    inputs = [rank_tensor(rank, (numel,), dtype) for rank in range(world)]
    uses_ring = numel * inputs[0].element_size() >= RING_MIN_BYTES
    results = run_on_local_ranks(
        world,
        lambda ch: all_reduce_(ch, inputs[ch.rank].clone(), ranks=range(world), key=KEY),
    )
    for result in results[1:]:
        assert torch.equal(result, results[0])
    if world == 2:
        assert torch.equal(results[0], inputs[0] + inputs[1])
    fold = inputs[0].clone()
    for tensor in inputs[1:]:
        fold += tensor
    if not uses_ring:
        assert torch.equal(results[0], fold)  # folded in rank order
    exact = torch.stack([t.double() for t in inputs]).sum(0)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-13
    assert torch.allclose(results[0].double(), exact, rtol=tolerance, atol=tolerance * 100)


@pytest.mark.timeout(60)
def test_ring_folds_segment_c_starting_at_rank_c() -> None:
    numel = 30_000  # 117 KiB of float32: the ring path, 3 segments of 10,000
    x = [rank_tensor(rank, (numel,)) for rank in range(3)]
    results = run_on_local_ranks(3, lambda ch: all_reduce_(ch, x[ch.rank].clone(), ranks=range(3), key=KEY))
    segments = [slice(0, 10_000), slice(10_000, 20_000), slice(20_000, 30_000)]
    expected = torch.cat([(x[c][s] + x[(c + 1) % 3][s]) + x[(c + 2) % 3][s] for c, s in enumerate(segments)])
    assert torch.equal(results[0], expected)
    # The fold order matters in float32: a plain rank-order fold differs in the last bits somewhere.
    assert not torch.equal(expected, (x[0] + x[1]) + x[2])


@pytest.mark.timeout(60)
def test_ring_sends_two_times_n_minus_one_over_n_of_the_tensor() -> None:
    world, numel = 4, 100_000
    channels = make_local_channels(world)
    run_on_local_ranks(
        world,
        lambda ch: all_reduce_(ch, rank_tensor(ch.rank, (numel,)), ranks=range(world), key=KEY),
        channels=channels,
    )
    expected = 2 * (world - 1) / world * numel * 4
    assert [ch.bytes_sent for ch in channels] == [expected] * world
    assert channels[0].undelivered() == []


@pytest.mark.timeout(60)
def test_all_reduce_in_place_on_a_subset_of_ranks_and_a_non_contiguous_tensor() -> None:
    matrices = [rank_tensor(rank, (300, 200), torch.float64) for rank in range(3)]

    def body(channel: LocalPeerChannel) -> torch.Tensor | None:
        if channel.rank == 1:
            return None  # not a member of this collective
        view = matrices[channel.rank].t()
        assert not view.is_contiguous()
        returned = all_reduce_(channel, view, ranks=[2, 0], key=KEY)
        assert returned is view
        return matrices[channel.rank]

    results = run_on_local_ranks(3, body)
    assert results[0] is not None
    assert results[2] is not None
    assert torch.equal(results[0], results[2])
    assert torch.allclose(
        results[0], rank_tensor(0, (300, 200), torch.float64) + rank_tensor(2, (300, 200), torch.float64)
    )


@pytest.mark.timeout(60)
def test_consecutive_calls_with_distinct_keys_do_not_mix() -> None:
    def body(channel: LocalPeerChannel) -> list[float]:
        first = all_reduce_(channel, torch.full((3,), float(channel.rank + 1)), ranks=range(3), key=KEY)
        second_key = TensorKey(step=4, micro_batch=-1, name="test")
        second = all_reduce_(channel, torch.full((3,), 10.0 * (channel.rank + 1)), ranks=range(3), key=second_key)
        return [float(first[0]), float(second[0])]

    assert run_on_local_ranks(3, body) == [[6.0, 60.0]] * 3


@pytest.mark.timeout(60)
def test_mismatched_shapes_raise_transport_error() -> None:
    with pytest.raises(TransportError, match="expected"):
        run_on_local_ranks(
            2,
            lambda ch: all_reduce_(ch, torch.zeros(4 + ch.rank), ranks=range(2), key=KEY, timeout=timedelta(seconds=5)),
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 3])
def test_all_gather_and_broadcast(world: int) -> None:
    def body(channel: LocalPeerChannel) -> tuple[list[torch.Tensor], torch.Tensor]:
        gathered = all_gather(channel, torch.full((2,), float(channel.rank)), ranks=range(world), key=KEY)
        target = torch.full((2, 2), float(channel.rank))
        broadcast_(channel, target, root=world - 1, ranks=range(world), key=KEY)
        return gathered, target

    for gathered, target in run_on_local_ranks(world, body):
        assert [t.tolist() for t in gathered] == [[float(r)] * 2 for r in range(world)]
        assert torch.equal(target, torch.full((2, 2), float(world - 1)))


def test_plan_buckets_groups_by_dtype_and_size() -> None:
    tensors = [
        torch.zeros(256, dtype=torch.float32),  # 1 KiB
        torch.zeros(128, dtype=torch.float64),  # 1 KiB
        torch.zeros(256, dtype=torch.float32),
        torch.zeros(1024, dtype=torch.float32),  # 4 KiB: larger than a bucket, alone
        torch.zeros(128, dtype=torch.float64),
    ]
    assert plan_buckets(tensors, bucket_bytes=2048) == [[0, 2], [1, 4], [3]]
    assert plan_buckets(tensors, bucket_bytes=1 << 20) == [[0, 2, 3], [1, 4]]


@pytest.mark.timeout(60)
def test_coalesced_all_reduce_and_broadcast_cover_every_tensor() -> None:
    shapes = [(3, 5), (1000,), (2, 2, 2), (70_000,), (1,)]
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float32, torch.float64]

    def make(rank: int) -> list[torch.Tensor]:
        return [
            rank_tensor(rank * 10 + i, shape, dtype)
            for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True))
        ]

    def body(channel: LocalPeerChannel) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        summed = make(channel.rank)
        all_reduce_coalesced_(channel, summed, ranks=range(2), key=KEY, bucket_bytes=8192)
        copied = make(channel.rank)
        broadcast_coalesced_(channel, copied, root=0, ranks=range(2), key=KEY, bucket_bytes=8192)
        return summed, copied

    results = run_on_local_ranks(2, body)
    for index in range(len(shapes)):
        expected = make(0)[index] + make(1)[index]
        assert torch.equal(results[0][0][index], expected)
        assert torch.equal(results[1][0][index], expected)
        assert torch.equal(results[1][1][index], make(0)[index])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threshold", [1 << 30, 1024], ids=["exchanged whole", "ring from 1 KiB"])
def test_ring_min_bytes_chooses_the_path(threshold: int) -> None:
    """A plan's threshold (`JobPlan.ring_min_bytes`) picks the algorithm: 117 KiB exchanged whole folds in
    rank order; 4 KiB from a 1 KiB threshold goes round the ring, which folds each segment from its owner."""
    numel = 30_000 if threshold > RING_MIN_BYTES else 1_002
    x = [rank_tensor(rank, (numel,)) for rank in range(3)]
    results = run_on_local_ranks(
        3, lambda ch: all_reduce_(ch, x[ch.rank].clone(), ranks=range(3), key=KEY, ring_min_bytes=threshold))
    in_rank_order = (x[0] + x[1]) + x[2]
    third = numel // 3
    segments = [slice(0, third), slice(third, 2 * third), slice(2 * third, numel)]
    round_the_ring = torch.cat([(x[c][s] + x[(c + 1) % 3][s]) + x[(c + 2) % 3][s] for c, s in enumerate(segments)])
    assert not torch.equal(in_rank_order, round_the_ring)
    for result in results:
        assert torch.equal(result, in_rank_order if threshold > RING_MIN_BYTES else round_the_ring)
