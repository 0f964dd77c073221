"""The sending side of the tensor stream: one long-lived stream per receiving peer, fed from a queue.

A `PeerSender` owns the stream from this worker to one peer. It opens the stream on the first tensor
(retrying while the peer is unreachable, until that tensor's deadline), writes each queued tensor as a
header and ~1 MiB chunk frames, and completes a tensor's future when the receiver acknowledges it. A
stream that breaks fails every unacknowledged tensor with the reason and is reopened for the next one.
Runs on the channel's event loop only; the futures are `concurrent.futures` ones so that callers on
other threads can wait for them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from cetd.transport.channel import TensorKey, TransportError
from cetd.transport.tensor_codec import (
    StreamOpening,
    describe_key,
    encode_chunks,
    encode_header,
    encode_open,
)
from cetd.wire import tensor_pb2

logger = logging.getLogger(__name__)

_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 1.0
_READER_GRACE_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SendItem:
    """One tensor queued for a peer."""

    key: TensorKey
    tensor: torch.Tensor
    """Kept referenced until sent; ``data`` is a view of its storage."""
    data: memoryview
    done: concurrent.futures.Future[None]
    deadline: float
    """`time.monotonic()` after which the peer counts as unreachable for this tensor."""


def _fail(item: SendItem, message: str) -> None:
    if not item.done.done():
        item.done.set_exception(TransportError(message))


class _Stream:
    """One open Exchange call and the tensors written on it that the receiver has not acknowledged."""

    def __init__(self, call: grpc.aio.StreamStreamCall[bytes, tensor_pb2.StreamAck], peer: int) -> None:
        self.call = call
        self.unacknowledged: deque[SendItem] = deque()
        self.broken: str | None = None
        self._peer = peer
        self._acknowledged = 0
        self.reader = asyncio.get_running_loop().create_task(self._read_acks())

    async def _read_acks(self) -> None:
        try:
            while True:
                ack = await self.call.read()
                if not isinstance(ack, tensor_pb2.StreamAck):
                    break  # grpc.aio.EOF: the receiver ended the stream
                if ack.refusal:
                    self.fail(f"peer rank {self._peer} refused the tensor stream: {ack.refusal}")
                    self.call.cancel()
                    return
                while self._acknowledged < ack.tensors_received and self.unacknowledged:
                    item = self.unacknowledged.popleft()
                    self._acknowledged += 1
                    if not item.done.done():
                        item.done.set_result(None)
        except grpc.aio.AioRpcError:
            pass
        self.fail(await _call_failure(self.call, self._peer))

    def fail(self, reason: str) -> None:
        """Mark the stream broken and fail every tensor still waiting for an acknowledgement."""
        if self.broken is None:
            self.broken = reason
        while self.unacknowledged:
            item = self.unacknowledged.popleft()
            _fail(item, f"{describe_key(item.key)} was lost: {self.broken}")


async def _call_failure(call: grpc.aio.StreamStreamCall[bytes, tensor_pb2.StreamAck], peer: int) -> str:
    code = await call.code()
    details = await call.details()
    if code == grpc.StatusCode.OK:
        return f"peer rank {peer} closed the tensor stream"
    return f"the tensor stream to peer rank {peer} failed: {code.name}: {details}"


class PeerSender:
    """Sends this worker's tensors for one peer, in the order they were queued."""

    def __init__(
        self,
        *,
        opening: StreamOpening,
        address: str,
        open_call: Callable[[], grpc.aio.StreamStreamCall[bytes, tensor_pb2.StreamAck]],
        chunk_bytes: int,
        checksum: bool,
    ) -> None:
        self._opening = opening
        self._peer = opening.receiver_rank
        self._address = address
        self._open_call = open_call
        self._chunk_bytes = chunk_bytes
        self._checksum = checksum
        self._queue: asyncio.Queue[SendItem | None] = asyncio.Queue()
        self._stream: _Stream | None = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"tensor-sender-{self._peer}")

    def enqueue(self, item: SendItem) -> None:
        """Queue a tensor (called on the loop thread)."""
        self._queue.put_nowait(item)

    async def close(self, grace: float) -> None:
        """Send what is queued and wait for its acknowledgements, for at most ``grace`` seconds."""
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except asyncio.TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        stream = self._stream
        if stream is not None:
            stream.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream.reader
            stream.call.cancel()
            stream.fail("the channel was closed")
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                _fail(item, f"the channel was closed before {describe_key(item.key)} was sent")

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            if item.done.done():
                continue
            try:
                stream = await self._ensure_stream(item.deadline)
            except TransportError as error:
                _fail(item, str(error))
                continue
            await self._write(stream, item)
        last = self._stream
        if last is not None and last.broken is None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await last.call.done_writing()
            await last.reader  # ends once the receiver acknowledged everything and closed

    async def _ensure_stream(self, deadline: float) -> _Stream:
        if self._stream is not None and self._stream.broken is None:
            return self._stream
        delay = _RETRY_FIRST_S
        while True:
            call = self._open_call()
            try:
                await call.write(encode_open(self._opening))
                ack = await asyncio.wait_for(call.read(), max(deadline - time.monotonic(), 0.001))
                if isinstance(ack, tensor_pb2.StreamAck):
                    self._stream = _Stream(call, self._peer)
                    return self._stream
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
            except asyncio.TimeoutError:
                call.cancel()
                raise TransportError(
                    f"peer rank {self._peer} at {self._address} did not accept a tensor stream in time"
                ) from None
            code = await call.code()
            reason = await _call_failure(call, self._peer)
            if code != grpc.StatusCode.UNAVAILABLE:
                raise TransportError(reason.replace("failed", "was refused", 1))
            if time.monotonic() + delay > deadline:
                raise TransportError(f"could not reach peer rank {self._peer} at {self._address}: {reason}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)

    async def _write(self, stream: _Stream, item: SendItem) -> None:
        stream.unacknowledged.append(item)
        try:
            await stream.call.write(encode_header(item.key, item.tensor, item.data, checksum=self._checksum))
            for frame in encode_chunks(item.data, self._chunk_bytes):
                await stream.call.write(frame)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # The ack reader knows better why (a refusal, or the status the receiver ended with).
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(stream.reader), _READER_GRACE_S)
            stream.fail(await _call_failure(stream.call, self._peer))
