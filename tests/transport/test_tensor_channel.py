"""Tests for cetd.transport.tensor_channel: two real channels on 127.0.0.1 in one process, mutual TLS."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch

from cetd.ids import JobId
from cetd.transport.channel import TensorKey, TensorSpec, TransportError
from cetd.transport.tensor_channel import GrpcPeerChannel, TensorChannelConfig
from tests.transport.conftest import TestDevice

torch.set_num_threads(1)

JOB = JobId("job-test")
MIB = 1024 * 1024


def _channel(
    device: TestDevice, rank: int, *, world_size: int = 2, config: TensorChannelConfig | None = None,
    authorize: Callable[[bytes], bool] = lambda pem: True, job_id: JobId = JOB,
) -> GrpcPeerChannel:
    return GrpcPeerChannel(
        rank=rank, world_size=world_size, job_id=job_id, tls=device.tls, authorize=authorize, config=config
    )


def _pair(household: list[TestDevice], config: TensorChannelConfig | None = None) -> tuple[GrpcPeerChannel, ...]:
    first, second = _channel(household[0], 0, config=config), _channel(household[1], 1, config=config)
    first.connect({1: (second.address, household[1].tls_name)})
    second.connect({0: (first.address, household[0].tls_name)})
    return first, second


@pytest.fixture
def pair(household: list[TestDevice]) -> Iterator[tuple[GrpcPeerChannel, ...]]:
    channels = _pair(household, TensorChannelConfig(timeout=timedelta(seconds=10)))
    yield channels
    for channel in channels:
        channel.close()


def _key(name: str, step: int = 0, micro_batch: int = 0) -> TensorKey:
    return TensorKey(step=step, micro_batch=micro_batch, name=name)


def _spec(tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(dtype=tensor.dtype, shape=tuple(tensor.shape))


def _bits(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


@pytest.mark.timeout(60)
def test_tensors_of_every_kind_arrive_bit_exact(pair: tuple[GrpcPeerChannel, ...]) -> None:
    first, second = pair
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "scalar": torch.tensor(-0.0),
        "empty": torch.empty(3, 0, 2),
        "act": torch.randn(8, 32, 64, generator=generator),
        "bf16": torch.randn(129, 7, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(1000, generator=generator).to(torch.float16),
        "f64": torch.randn(17, 3, dtype=torch.float64, generator=generator),
        "ids": torch.randint(0, 50257, (8, 32), generator=generator),
        "mask": torch.rand(8, 32, generator=generator) > 0.5,
        "nan": torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-45]),
        "big": torch.randn(20 * MIB // 4, generator=generator),  # 20 MiB: 20 chunks
        "strided": torch.randn(64, 48, generator=generator)[:, ::3],
    }
    handles = [first.send(1, _key(name), tensor) for name, tensor in tensors.items()]
    for name, tensor in tensors.items():
        received = second.recv(0, _key(name), _spec(tensor))
        assert (received.dtype, received.shape) == (tensor.dtype, tensor.shape)
        assert _bits(received) == _bits(tensor), name
    for handle in handles:
        handle.wait()
    # And the other direction over the other stream.
    back = torch.arange(12, dtype=torch.int16).reshape(3, 4)
    second.send(0, _key("back"), back).wait()
    assert torch.equal(first.recv(1, _key("back"), _spec(back)), back)


@pytest.mark.timeout(60)
def test_receives_match_by_key_in_any_order(pair: tuple[GrpcPeerChannel, ...]) -> None:
    first, second = pair
    sent = {(step, mb): torch.full((4, 4), float(10 * step + mb)) for step in range(2) for mb in range(3)}
    handles = [first.send(1, _key("act", step, mb), tensor) for (step, mb), tensor in sent.items()]
    for handle in handles:
        handle.wait()  # all of them sit in the inbox before anything is received
    order = [(1, 2), (0, 0), (1, 0), (0, 2), (0, 1), (1, 1)]
    received = [second.recv(0, _key("act", step, mb), _spec(sent[0, 0]))[0, 0].item() for step, mb in order]
    assert received == [12.0, 0.0, 10.0, 2.0, 1.0, 11.0]


@pytest.mark.timeout(60)
def test_receive_posted_before_send(pair: tuple[GrpcPeerChannel, ...]) -> None:
    first, second = pair
    tensor = torch.randn(100)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(second.recv, 0, _key("late"), _spec(tensor))
        time.sleep(0.3)
        assert not future.done()
        first.send(1, _key("late"), tensor).wait()
        assert torch.equal(future.result(timeout=10), tensor)


@pytest.mark.timeout(60)
def test_wrong_shape_or_dtype_is_a_transport_error(pair: tuple[GrpcPeerChannel, ...]) -> None:
    first, second = pair
    first.send(1, _key("act", step=3), torch.zeros(8, 32, 64)).wait()
    with pytest.raises(TransportError) as error:
        second.recv(0, _key("act", step=3), TensorSpec(dtype=torch.float32, shape=(8, 32, 128)))
    assert str(error.value) == "peer rank 0 sent act step 3 mb 0 as float32[8,32,64], expected float32[8,32,128]"
    first.send(1, _key("grad", 4, -1), torch.zeros(2, dtype=torch.float64)).wait()
    with pytest.raises(TransportError, match="sent grad step 4 as float64\\[2\\], expected float32\\[2\\]"):
        second.recv(0, _key("grad", 4, -1), TensorSpec(dtype=torch.float32, shape=(2,)))


@pytest.mark.timeout(60)
def test_missing_tensor_times_out(pair: tuple[GrpcPeerChannel, ...]) -> None:
    _, second = pair
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"peer rank 0 did not send act step 9 mb 0 within 0\.5 s"):
        second.recv(0, _key("act", 9), TensorSpec(dtype=torch.float32, shape=(1,)), timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 3


@pytest.mark.timeout(60)
def test_full_inbox_stops_the_sender(household: list[TestDevice]) -> None:
    config = TensorChannelConfig(inbox_bytes=1 * MIB, timeout=timedelta(seconds=20))
    first, second = _pair(household, config)
    try:
        tensors = [torch.full((MIB // 4,), float(i)) for i in range(16)]  # 16 x 1 MiB
        handles = [first.send(1, _key("act", 0, i), t) for i, t in enumerate(tensors)]
        handles[0].wait()
        time.sleep(1.0)
        with pytest.raises(TransportError, match="did not take act step 0 mb 1"):
            handles[1].wait(timeout=0.1)  # one tensor fills the 1 MiB inbox: the rest must wait
        # A receive for a tensor further down the stream is admitted past the full inbox.
        assert second.recv(0, _key("act", 0, 1), _spec(tensors[1]))[0].item() == 1.0
        for i in [0, *range(2, 16)]:
            assert second.recv(0, _key("act", 0, i), _spec(tensors[i]))[0].item() == float(i)
        for handle in handles:
            handle.wait()
    finally:
        first.close()
        second.close()


@pytest.mark.timeout(60)
def test_oversized_announcement_is_refused(household: list[TestDevice]) -> None:
    small = TensorChannelConfig(max_tensor_bytes=MIB, timeout=timedelta(seconds=10))
    first = _channel(household[0], 0)
    second = _channel(household[1], 1, config=small)
    try:
        first.connect({1: (second.address, household[1].tls_name)})
        second.connect({0: (first.address, household[0].tls_name)})
        handle = first.send(1, _key("huge"), torch.zeros(MIB // 4 + 1))
        with pytest.raises(TransportError, match="refused the tensor stream: huge step 0 mb 0 announces 1048580 bytes, more than the 1048576"):
            handle.wait()
        with pytest.raises(TransportError, match="peer rank 0 sent an invalid frame"):
            second.recv(0, _key("huge"), TensorSpec(dtype=torch.float32, shape=(MIB // 4 + 1,)), timeout=5)
        # The sender opens a new stream for what comes next.
        first.send(1, _key("fine"), torch.ones(3)).wait()
        assert torch.equal(second.recv(0, _key("fine"), TensorSpec(dtype=torch.float32, shape=(3,))), torch.ones(3))
    finally:
        first.close()
        second.close()


@pytest.mark.timeout(60)
def test_streams_wait_until_the_receiver_knows_its_peers(household: list[TestDevice]) -> None:
    first, second = _channel(household[0], 0), _channel(household[1], 1)
    try:
        first.connect({1: (second.address, household[1].tls_name)})
        handle = first.send(1, _key("early"), torch.arange(5))
        with pytest.raises(TransportError, match="did not take early step 0 mb 0"):
            handle.wait(timeout=0.5)  # refused as unavailable, retried
        second.connect({0: (first.address, household[0].tls_name)})
        handle.wait(timeout=10)
        assert torch.equal(second.recv(0, _key("early"), TensorSpec(dtype=torch.int64, shape=(5,))), torch.arange(5))
    finally:
        first.close()
        second.close()


@pytest.mark.timeout(60)
def test_unauthorized_certificate_is_refused(household: list[TestDevice]) -> None:
    seen: list[bytes] = []

    def refuse(pem: bytes) -> bool:
        seen.append(pem)
        return False

    first = _channel(household[0], 0)
    second = _channel(household[1], 1, authorize=refuse)
    try:
        first.connect({1: (second.address, household[1].tls_name)})
        second.connect({0: (first.address, household[0].tls_name)})
        started = time.monotonic()
        with pytest.raises(TransportError, match="refused: PERMISSION_DENIED: certificate not authorized"):
            first.send(1, _key("act"), torch.ones(3)).wait()
        assert time.monotonic() - started < 5
        assert seen == [household[0].cert_pem]
    finally:
        first.close()
        second.close()


@pytest.mark.timeout(60)
def test_certificate_of_another_rank_is_refused(household: list[TestDevice]) -> None:
    receiver = _channel(household[0], 0, world_size=3)
    impostor = _channel(household[2], 1, world_size=3)  # a member, but rank 1 is household[1]
    try:
        receiver.connect({1: ("127.0.0.1:1", household[1].tls_name), 2: ("127.0.0.1:1", household[2].tls_name)})
        impostor.connect({0: (receiver.address, household[0].tls_name)})
        with pytest.raises(TransportError, match="PERMISSION_DENIED: the certificate presented is not the one of rank 1"):
            impostor.send(0, _key("act"), torch.ones(3)).wait()
    finally:
        receiver.close()
        impostor.close()


@pytest.mark.timeout(60)
def test_other_job_is_refused(household: list[TestDevice]) -> None:
    first = _channel(household[0], 0, job_id=JobId("other-job"))
    second = _channel(household[1], 1)
    try:
        first.connect({1: (second.address, household[1].tls_name)})
        second.connect({0: (first.address, household[0].tls_name)})
        with pytest.raises(TransportError, match="serves job 'job-test', not 'other-job'"):
            first.send(1, _key("act"), torch.ones(3)).wait()
    finally:
        first.close()
        second.close()


@pytest.mark.timeout(60)
def test_certificate_from_another_ca_cannot_connect(household: list[TestDevice], stranger: TestDevice) -> None:
    called: list[bytes] = []

    def authorize(pem: bytes) -> bool:
        called.append(pem)
        return True

    config = TensorChannelConfig(timeout=timedelta(seconds=2))
    member = _channel(household[0], 0, authorize=authorize)
    intruder = _channel(stranger, 1, config=config)
    try:
        intruder.connect({0: (member.address, household[0].tls_name)})
        started = time.monotonic()
        with pytest.raises(TransportError, match=r"could not reach peer rank 0 .*UNAVAILABLE"):
            intruder.send(0, _key("act"), torch.ones(3)).wait(timeout=10)
        assert time.monotonic() - started < 5
        assert called == []  # the TLS handshake failed before any stream reached the servicer
    finally:
        member.close()
        intruder.close()


@pytest.mark.timeout(60)
def test_unreachable_peer_fails_within_timeout(household: list[TestDevice]) -> None:
    config = TensorChannelConfig(timeout=timedelta(seconds=1))
    first = _channel(household[0], 0, config=config)
    try:
        first.connect({1: ("127.0.0.1:1", household[1].tls_name)})
        started = time.monotonic()
        with pytest.raises(TransportError, match=r"could not reach peer rank 1 at 127\.0\.0\.1:1") as failed:
            first.send(1, _key("act"), torch.ones(3)).wait(timeout=10)
        assert time.monotonic() - started < 3
        assert failed.value.peer == 1  # the job's driver reports this rank as the lost one
    finally:
        first.close()


@pytest.mark.timeout(60)
def test_peer_that_closes_fails_pending_receives_at_once(household: list[TestDevice]) -> None:
    first, second = _pair(household)
    try:
        second.send(0, _key("act", 0), torch.ones(1))
        second.close()  # flushes the queued tensor, then ends its stream
        with pytest.raises(TransportError, match="rank 1 is closed"):
            second.send(0, _key("act", 1), torch.ones(1))
        spec = TensorSpec(dtype=torch.float32, shape=(1,))
        assert first.recv(1, _key("act", 0), spec, timeout=5).item() == 1.0
        started = time.monotonic()
        with pytest.raises(TransportError, match="peer rank 1 ended its stream before sending act step 1 mb 0") as ended:
            first.recv(1, _key("act", 1), spec, timeout=30)
        assert time.monotonic() - started < 1
        assert ended.value.peer == 1
    finally:
        first.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("numel", [1, 249, 250, 251, 1000], ids=["tiny", "under", "exact", "over", "four"])
def test_tensors_around_the_chunk_size_arrive_bit_exact(household: list[TestDevice], numel: int) -> None:
    # 250 float32 = 1000 bytes = one chunk: up to it a tensor is one frame (header and bytes), past it more.
    first, second = _pair(household, TensorChannelConfig(chunk_bytes=1000, timeout=timedelta(seconds=10)))
    try:
        tensor = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
        first.send(1, _key("act"), tensor).wait()
        assert _bits(second.recv(0, _key("act"), _spec(tensor))) == _bits(tensor)
    finally:
        first.close()
        second.close()


@pytest.mark.timeout(60)
def test_burst_of_small_tensors_is_all_acknowledged_and_a_lone_one_at_once(pair: tuple[GrpcPeerChannel, ...]) -> None:
    first, second = pair
    tensors = [torch.full((16,), float(i)) for i in range(300)]
    handles = [first.send(1, _key("act", 0, i), t) for i, t in enumerate(tensors)]
    for handle in handles:
        handle.wait()  # deferred acknowledgements still cover every tensor of the burst
    assert [second.recv(0, _key("act", 0, i), _spec(t))[0].item() for i, t in enumerate(tensors)] == list(range(300))
    started = time.monotonic()
    first.send(1, _key("alone"), torch.ones(2)).wait(timeout=5)
    assert time.monotonic() - started < 1  # nothing queued behind it: acknowledged without waiting for more


@pytest.mark.timeout(60)
def test_receives_from_several_threads(pair: tuple[GrpcPeerChannel, ...]) -> None:
    first, second = pair
    spec = TensorSpec(dtype=torch.int64, shape=(3,))
    with ThreadPoolExecutor(4) as pool:
        futures = {i: pool.submit(second.recv, 0, _key("act", 1, i), spec) for i in range(40)}
        for i in reversed(range(40)):
            first.send(1, _key("act", 1, i), torch.full((3,), i))
        assert {i: int(future.result(timeout=20)[0]) for i, future in futures.items()} == {i: i for i in range(40)}


@pytest.mark.timeout(60)
def test_close_fails_a_waiting_receive(household: list[TestDevice]) -> None:
    first, second = _pair(household)
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(second.recv, 0, _key("never"), TensorSpec(dtype=torch.float32, shape=(1,)), 30)
            time.sleep(0.3)
            second.close()
            with pytest.raises(TransportError, match="closed while waiting for never step 0 mb 0"):
                waiting.result(timeout=10)
    finally:
        first.close()
        second.close()


@pytest.mark.timeout(60)
def test_abort_wakes_a_receive_and_close_then_drops_unsendable_tensors(household: list[TestDevice]) -> None:
    first, second = _pair(household)
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(second.recv, 0, _key("never"), TensorSpec(dtype=torch.float32, shape=(1,)), 30)
            time.sleep(0.3)
            second.abort("peer rank 0 stopped answering heartbeats")
            with pytest.raises(TransportError):
                waiting.result(timeout=5)
        # Nothing more is sent once aborted, and close() does not wait on the peer.
        first.close()
        with pytest.raises(TransportError, match="aborted"):
            second.send(0, _key("act"), torch.zeros(1024))
        started = time.monotonic()
        second.close()
        assert time.monotonic() - started < 2.0
    finally:
        first.close()
        second.close()
