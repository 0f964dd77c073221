"""The sending side of the tensor stream: one long-lived stream per receiving peer, fed from a queue.

A `PeerSender` owns the stream from this worker to one peer. It opens the stream on the first tensor
(retrying while the peer is unreachable, until that tensor's deadline), writes each queued tensor as a
header frame carrying the first chunk (512 KiB by default) and then chunk frames, and completes a
tensor's future when the receiver acknowledges it. While more tensors are queued behind one, the sender
lets the receiver acknowledge it together with a later one (within `_DEFER_MAX_TENSORS` and
`_DEFER_MAX_BYTES`), so a burst of small tensors costs a few acknowledgements rather than one each;
the last tensor of a burst is always acknowledged at once. A stream that breaks fails every
unacknowledged tensor with the reason and is reopened for the next one. `submit` may be called from any
thread and wakes the event loop only when the sender is idle; everything else runs on the channel's
event loop. The futures are `concurrent.futures` ones so that callers on other threads can wait for them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
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
    encode_open,
    encode_tensor,
)
from cetd.wire import tensor_pb2

logger = logging.getLogger(__name__)

_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 1.0
_READER_GRACE_S = 1.0
_DEFER_MAX_TENSORS = 32
"""Most tensors in a row whose acknowledgement the receiver may hold back."""
_DEFER_MAX_BYTES = 16 * 1024 * 1024
"""Most bytes in a row whose acknowledgement the receiver may hold back."""


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


def _fail(item: SendItem, message: str, peer: int) -> None:
    if not item.done.done():
        item.done.set_exception(TransportError(message, peer=peer))


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
            _fail(item, f"{describe_key(item.key)} was lost: {self.broken}", self._peer)


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
        self._loop = asyncio.get_running_loop()
        # Filled from any thread under the lock; the loop is woken only when the writer sleeps on `_ready`.
        self._lock = threading.Lock()
        self._pending: deque[SendItem | None] = deque()
        self._sleeping = False
        self._ready = asyncio.Event()
        self._stream: _Stream | None = None
        self._deferred_tensors = 0
        self._deferred_bytes = 0
        self._task = self._loop.create_task(self._run(), name=f"tensor-sender-{self._peer}")

    def submit(self, item: SendItem) -> None:
        """Queue a tensor (from any thread)."""
        self._put(item)

    def _put(self, item: SendItem | None) -> None:
        with self._lock:
            self._pending.append(item)
            wake = self._sleeping
            self._sleeping = False
        if wake:
            self._loop.call_soon_threadsafe(self._ready.set)

    async def _next_item(self) -> SendItem | None:
        while True:
            with self._lock:
                if self._pending:
                    return self._pending.popleft()
                self._sleeping = True
                self._ready.clear()
            await self._ready.wait()

    def _more_queued(self) -> bool:
        with self._lock:
            return any(item is not None and not item.done.done() for item in self._pending)

    async def close(self, grace: float) -> None:
        """Send what is queued and wait for its acknowledgements, for at most ``grace`` seconds."""
        self._put(None)
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
        with self._lock:
            left, self._pending = list(self._pending), deque()
        for item in left:
            if item is not None:
                _fail(item, f"the channel was closed before {describe_key(item.key)} was sent", self._peer)

    async def _run(self) -> None:
        while (item := await self._next_item()) is not None:
            if item.done.done():
                continue
            try:
                stream = await self._ensure_stream(item.deadline)
            except TransportError as error:
                _fail(item, str(error), self._peer)
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
        self._deferred_tensors = self._deferred_bytes = 0
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
                    f"peer rank {self._peer} at {self._address} did not accept a tensor stream in time",
                    peer=self._peer,
                ) from None
            code = await call.code()
            reason = await _call_failure(call, self._peer)
            if code != grpc.StatusCode.UNAVAILABLE:
                raise TransportError(reason.replace("failed", "was refused", 1), peer=self._peer)
            if time.monotonic() + delay > deadline:
                raise TransportError(
                    f"could not reach peer rank {self._peer} at {self._address}: {reason}", peer=self._peer
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)

    def _defer_ack(self, item: SendItem) -> bool:
        """Whether the receiver may acknowledge ``item`` together with a later tensor."""
        if (
            self._deferred_tensors >= _DEFER_MAX_TENSORS
            or self._deferred_bytes + item.data.nbytes > _DEFER_MAX_BYTES
            or not self._more_queued()
        ):
            self._deferred_tensors = self._deferred_bytes = 0
            return False
        self._deferred_tensors += 1
        self._deferred_bytes += item.data.nbytes
        return True

    async def _write(self, stream: _Stream, item: SendItem) -> None:
        stream.unacknowledged.append(item)
        frames = encode_tensor(
            item.key, item.tensor, item.data,
            chunk_bytes=self._chunk_bytes, checksum=self._checksum, defer_ack=self._defer_ack(item),
        )
        try:
            for frame in frames:
                await stream.call.write(frame)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # The ack reader knows better why (a refusal, or the status the receiver ended with).
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(stream.reader), _READER_GRACE_S)
            stream.fail(await _call_failure(stream.call, self._peer))
