"""Tests for cetd.transport.tensor_server's in-memory parts: acknowledgement batching and the inbox."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from cetd.transport.channel import TensorKey, TransportError
from cetd.transport.tensor_codec import ReceivedTensor, TensorAnnouncement
from cetd.transport.tensor_server import TensorInbox, _AckWriter
from cetd.wire import tensor_pb2

torch.set_num_threads(1)


class _RecordingContext:
    """Stands in for a servicer context: records the acknowledgements written."""

    def __init__(self) -> None:
        self.written: list[int] = []

    async def write(self, ack: tensor_pb2.StreamAck) -> None:
        self.written.append(ack.tensors_received)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.timeout(30)
def test_deferred_tensors_are_acknowledged_with_the_next_one_a_pause_or_the_end() -> None:
    async def scenario() -> list[list[int]]:
        context = _RecordingContext()
        acks = _AckWriter(context)  # type: ignore[arg-type]  # only write() is used
        steps = []
        for _ in range(5):
            acks.received(defer=True)
        await _settle()
        steps.append(list(context.written))  # nothing yet: the sender said more was coming
        acks.received(defer=False)
        await _settle()
        steps.append(list(context.written))  # one ack covers all six
        acks.received(defer=True)
        acks.flush()  # the receiver is about to pause the stream
        await _settle()
        steps.append(list(context.written))
        acks.received(defer=True)
        await acks.close()
        steps.append(list(context.written))
        return steps

    assert asyncio.run(scenario()) == [[], [6], [6, 7], [6, 7, 8]]


def _received(step: int, nbytes: int) -> ReceivedTensor:
    announcement = TensorAnnouncement(
        key=TensorKey(step=step, micro_batch=0, name="act"), dtype=torch.uint8, shape=(nbytes,),
        total_bytes=nbytes, crc32=None,
    )
    return ReceivedTensor(announcement=announcement, buffer=np.full(nbytes, step, dtype=np.uint8))


@pytest.mark.timeout(30)
def test_take_from_another_thread_and_its_timeout() -> None:
    inbox = TensorInbox(world_size=2, max_bytes=1000, max_count=10)
    timer = threading.Timer(0.2, inbox.put, args=(1, _received(4, 3)))
    timer.start()
    taken = inbox.take(1, TensorKey(step=4, micro_batch=0, name="act"), timeout=10)
    assert torch.equal(taken.tensor(), torch.full((3,), 4, dtype=torch.uint8))
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"peer rank 1 did not send act step 5 mb 0 within 0\.3 s"):
        inbox.take(1, TensorKey(step=5, micro_batch=0, name="act"), timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 2
    inbox.close()
    with pytest.raises(TransportError, match="closed while waiting"):
        inbox.take(1, TensorKey(step=6, micro_batch=0, name="act"), timeout=10)


@pytest.mark.timeout(30)
def test_full_inbox_admits_once_a_take_makes_room() -> None:
    inbox = TensorInbox(world_size=2, max_bytes=100, max_count=10)
    inbox.put(1, _received(0, 80))
    big = _received(1, 80).announcement
    assert not inbox.has_room(1, big)

    async def admit_while_another_thread_takes() -> float:
        loop_started = time.monotonic()
        threading.Timer(0.2, inbox.take, args=(1, TensorKey(step=0, micro_batch=0, name="act"), 10)).start()
        await asyncio.wait_for(inbox.admit(1, big), 10)
        return time.monotonic() - loop_started

    assert 0.2 <= asyncio.run(admit_while_another_thread_takes()) < 5
    assert inbox.has_room(1, big)
