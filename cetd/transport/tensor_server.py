"""The receiving side of the tensor stream: the servicer and the bounded per-peer inbox it fills.

Every stream is authorized (the caller's certificate, then its job, ranks and, once peers are known,
that the certificate is the one of the rank it claims), then read frame by frame into preallocated
buffers. Complete tensors wait in the inbox of their sender until `TensorInbox.take` claims them by key,
so sends may arrive in any order relative to receives. When a sender's inbox is full the servicer stops
reading its stream, and HTTP/2 flow control stops the sender. The servicer runs on the channel's event
loop; `take` is called from the runtime's thread and blocks on a condition variable, so a receive costs
one thread wake-up (when the tensor was not there yet) instead of a round trip through the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509

from cetd.ids import JobId
from cetd.transport.channel import TensorKey, TransportError
from cetd.transport.tensor_codec import (
    FrameError,
    HeaderFrame,
    ReceivedTensor,
    StreamOpening,
    TensorAnnouncement,
    TensorAssembler,
    decode_frame,
    describe_key,
)
from cetd.wire import tensor_pb2

logger = logging.getLogger(__name__)

SERVICE_NAME: str = tensor_pb2.DESCRIPTOR.services_by_name["TensorStream"].full_name
EXCHANGE_METHOD = f"/{SERVICE_NAME}/Exchange"

_LAST_ACK_S = 5.0
"""How long the end of a stream waits to write its last acknowledgement."""
_REFUSAL_DRAIN_S = 10.0
"""How long a refused stream's frames are discarded while waiting for the sender to cancel it."""


@dataclass(slots=True)
class _PeerInbox:
    """Complete tensors from one sender that no `take` claimed yet, and why its stream ended, if it did."""

    tensors: dict[TensorKey, deque[ReceivedTensor]] = field(default_factory=dict)
    stored_bytes: int = 0
    stored_count: int = 0
    waiting: dict[TensorKey, int] = field(default_factory=dict)
    failure: str | None = None
    latest_stream: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)
    room: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
    """The servicer's wait for room, when its stream is paused: woken by whatever may have made room."""


class TensorInbox:
    """Received tensors per sender rank, bounded per sender in bytes and count.

    A tensor is always admitted when its sender's inbox is empty or when a `take` waits for its key, so a
    receiver that asks for the next tensor in its sender's order never deadlocks on a full inbox.
    Thread-safe: the servicer fills it on the event loop, the runtime takes from it on its own thread.
    """

    def __init__(self, *, world_size: int, max_bytes: int, max_count: int) -> None:
        self._max_bytes = max_bytes
        self._max_count = max_count
        self._peers = [_PeerInbox() for _ in range(world_size)]
        self._closed = False

    def has_room(self, sender: int, announcement: TensorAnnouncement) -> bool:
        """Whether the sender's inbox admits an announced tensor now."""
        inbox = self._peers[sender]
        with inbox.changed:
            return self._has_room(inbox, announcement)

    async def admit(self, sender: int, announcement: TensorAnnouncement) -> None:
        """Wait until the sender's inbox has room for an announced tensor (on the event loop)."""
        inbox = self._peers[sender]
        while True:
            with inbox.changed:
                if self._has_room(inbox, announcement):
                    return
                room = asyncio.get_running_loop().create_future()
                inbox.room = (room.get_loop(), room)
            await room

    def _has_room(self, inbox: _PeerInbox, announcement: TensorAnnouncement) -> bool:
        return (
            inbox.stored_count == 0
            or announcement.key in inbox.waiting
            or (
                inbox.stored_bytes + announcement.total_bytes <= self._max_bytes
                and inbox.stored_count < self._max_count
            )
        )

    @staticmethod
    def _wake_admission(inbox: _PeerInbox) -> None:
        # Called with inbox.changed held; the servicer re-checks for room itself.
        if inbox.room is not None:
            loop, room = inbox.room
            inbox.room = None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_set_if_pending, room)

    def put(self, sender: int, received: ReceivedTensor) -> None:
        """Store a complete tensor and wake whoever waits for it."""
        inbox = self._peers[sender]
        with inbox.changed:
            inbox.tensors.setdefault(received.announcement.key, deque()).append(received)
            inbox.stored_bytes += received.announcement.total_bytes
            inbox.stored_count += 1
            inbox.changed.notify_all()

    def take(self, sender: int, key: TensorKey, timeout: float) -> ReceivedTensor:
        """Wait up to ``timeout`` seconds for the tensor ``key`` from ``sender`` and remove it from the inbox.

        Raises:
            TransportError: the sender's stream ended before the tensor arrived, the time ran out, or
                the inbox was closed.
        """
        inbox = self._peers[sender]
        deadline = time.monotonic() + timeout
        with inbox.changed:
            inbox.waiting[key] = inbox.waiting.get(key, 0) + 1
            self._wake_admission(inbox)  # a paused stream may now admit this key
            try:
                while key not in inbox.tensors and inbox.failure is None and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TransportError(
                            f"peer rank {sender} did not send {describe_key(key)} within {timeout:g} s", peer=sender
                        )
                    inbox.changed.wait(left)
            finally:
                inbox.waiting[key] -= 1
                if not inbox.waiting[key]:
                    del inbox.waiting[key]
            if key not in inbox.tensors:
                if self._closed:
                    raise TransportError(f"the channel was closed while waiting for {describe_key(key)}")
                raise TransportError(
                    f"peer rank {sender} {inbox.failure} before sending {describe_key(key)}", peer=sender
                )
            queue = inbox.tensors[key]
            received = queue.popleft()
            if not queue:
                del inbox.tensors[key]
            inbox.stored_bytes -= received.announcement.total_bytes
            inbox.stored_count -= 1
            self._wake_admission(inbox)
            return received

    def stream_opened(self, sender: int) -> int:
        """Note a new stream from ``sender`` (clearing an earlier failure); returns its token."""
        inbox = self._peers[sender]
        with inbox.changed:
            inbox.latest_stream += 1
            inbox.failure = None
            return inbox.latest_stream

    def stream_ended(self, sender: int, token: int, failure: str) -> None:
        """Record why the sender's stream ended, failing waiting takes, unless a newer stream replaced it."""
        inbox = self._peers[sender]
        with inbox.changed:
            if token == inbox.latest_stream:
                inbox.failure = failure
                inbox.changed.notify_all()

    def close(self) -> None:
        """Fail every waiting and later `take`."""
        self._closed = True
        for inbox in self._peers:
            with inbox.changed:
                inbox.changed.notify_all()


def _set_if_pending(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def certificate_dns_names(cert_pem: bytes) -> list[str]:
    """The DNS names in a PEM certificate's subject alternative names."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


class TensorStreamServicer:
    """Serves ``TensorStream.Exchange`` for one worker: authorizes streams and fills the inbox."""

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        job_id: JobId,
        authorize: Callable[[bytes], bool],
        inbox: TensorInbox,
        max_tensor_bytes: int,
        peer_names: Callable[[], Mapping[int, str] | None],
    ) -> None:
        self._rank = rank
        self._world_size = world_size
        self._job_id = job_id
        self._authorize = authorize
        self._inbox = inbox
        self._max_tensor_bytes = max_tensor_bytes
        self._peer_names = peer_names

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The generic handler to add to a grpc.aio server; frames reach the servicer as raw bytes."""
        method = grpc.stream_stream_rpc_method_handler(
            self._exchange,
            request_deserializer=None,  # raw bytes: chunks are decoded without a protobuf copy
            response_serializer=tensor_pb2.StreamAck.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Exchange": method})

    async def _exchange(self, requests: object, context: grpc.aio.ServicerContext[bytes, object]) -> None:
        # Read the opening before refusing anything: aborting while the sender's first write is still in
        # flight makes grpc report that write's failure as a bare INTERNAL error instead of our status.
        first = await context.read()
        cert = list(context.auth_context().get("x509_pem_cert", []))
        if not cert or not self._authorize(cert[0]):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate not authorized")
        opening = self._decode_opening(first)
        if not isinstance(opening, StreamOpening):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a stream must begin with StreamOpen")
            return
        names = self._peer_names()
        if names is None:  # the sender retries UNAVAILABLE until this worker knows its peers
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"rank {self._rank} is not connected to its peers yet")
            return
        refusal = self._check_opening(opening, cert[0], names)
        if refusal is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        sender = opening.sender_rank
        token = self._inbox.stream_opened(sender)
        await context.write(tensor_pb2.StreamAck(tensors_received=0))
        failure = "broke its stream"
        try:
            await self._receive(sender, context)
            # A peer that vanished reads as the end of its stream too, so do not claim it closed cleanly.
            failure = "ended its stream"
        except FrameError as error:
            failure = f"sent an invalid frame ({error})"
            logger.warning("refusing tensor stream from rank %d: %s", sender, error)
            await self._refuse(context, str(error))
        finally:
            self._inbox.stream_ended(sender, token, failure)

    def _decode_opening(self, frame: object) -> StreamOpening | None:
        try:
            decoded = decode_frame(frame, max_tensor_bytes=self._max_tensor_bytes) if isinstance(frame, bytes) else None
        except FrameError:
            return None
        return decoded if isinstance(decoded, StreamOpening) else None

    def _check_opening(self, opening: StreamOpening, cert_pem: bytes, names: Mapping[int, str]) -> str | None:
        if opening.job_id != self._job_id:
            return f"this worker serves job {self._job_id!r}, not {opening.job_id!r}"
        if opening.receiver_rank != self._rank:
            return f"this worker is rank {self._rank}, not {opening.receiver_rank}"
        if not 0 <= opening.sender_rank < self._world_size or opening.sender_rank == self._rank:
            return f"sender rank {opening.sender_rank} is not a peer in a world of {self._world_size}"
        expected = names.get(opening.sender_rank)
        if expected is None:
            return f"rank {opening.sender_rank} is not among this worker's peers"
        if expected not in certificate_dns_names(cert_pem):
            return f"the certificate presented is not the one of rank {opening.sender_rank} ({expected})"
        return None

    async def _refuse(self, context: grpc.aio.ServicerContext[bytes, object], reason: str) -> None:
        # Aborting at once would race the sender's next write, whose failure grpc reports as a bare
        # INTERNAL error; instead say why on the ack stream and discard until the sender cancels.
        await context.write(tensor_pb2.StreamAck(refusal=reason))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._discard(context), _REFUSAL_DRAIN_S)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)

    @staticmethod
    async def _discard(context: grpc.aio.ServicerContext[bytes, object]) -> None:
        while isinstance(await context.read(), bytes):
            pass

    async def _receive(self, sender: int, context: grpc.aio.ServicerContext[bytes, object]) -> None:
        acks = _AckWriter(context)
        try:
            await self._receive_frames(sender, context, acks)
        finally:
            await acks.close()

    async def _receive_frames(
        self, sender: int, context: grpc.aio.ServicerContext[bytes, object], acks: _AckWriter
    ) -> None:
        assembler: TensorAssembler | None = None
        while True:
            frame = await context.read()
            if not isinstance(frame, bytes):  # grpc.aio.EOF (no request deserializer: frames are bytes)
                if assembler is not None:
                    raise FrameError(f"stream ended inside {describe_key(assembler.announcement.key)}")
                return
            decoded = decode_frame(frame, max_tensor_bytes=self._max_tensor_bytes)
            if isinstance(decoded, memoryview):
                if assembler is None:
                    raise FrameError("a chunk arrived without a header")
                assembler.add(decoded)
            elif isinstance(decoded, HeaderFrame):
                announcement = decoded.announcement
                if assembler is not None:
                    raise FrameError(f"a header arrived inside {describe_key(assembler.announcement.key)}")
                if not self._inbox.has_room(sender, announcement):
                    # Not reading here is the backpressure. Acknowledge what arrived first, so that a
                    # sender waiting on a deferred acknowledgement is not held up by the pause.
                    acks.flush()
                    await self._inbox.admit(sender, announcement)
                assembler = TensorAssembler(announcement)
                if decoded.first_chunk.nbytes:
                    assembler.add(decoded.first_chunk)
            else:
                raise FrameError("StreamOpen sent twice")
            if assembler is not None and assembler.complete:
                self._inbox.put(sender, assembler.received())
                acks.received(defer=assembler.announcement.defer_ack)
                assembler = None


class _AckWriter:
    """Acknowledges received tensors without holding up the reading: one ack covers all since the last.

    A tensor whose sender deferred its acknowledgement is only counted; the next tensor that is not
    deferred, a pause for inbox room, or the end of the stream writes the count. While a write is in
    flight the count keeps growing and the next write reports it whole.
    """

    def __init__(self, context: grpc.aio.ServicerContext[bytes, object]) -> None:
        self._context = context
        self._received = 0
        self._written = 0
        self._closing = False
        self._pending = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def received(self, *, defer: bool) -> None:
        """Count one more complete tensor; acknowledge it (and all before it) soon unless ``defer``."""
        self._received += 1
        if not defer:
            self._pending.set()

    def flush(self) -> None:
        """Acknowledge every tensor counted so far, deferred ones included."""
        if self._received > self._written:
            self._pending.set()

    async def close(self) -> None:
        """Write the last count, if it is not acknowledged yet, and stop."""
        self._closing = True
        self._pending.set()
        try:
            await asyncio.wait_for(self._task, _LAST_ACK_S)
        except Exception:  # the stream is gone or stuck: nothing left to acknowledge to
            self._task.cancel()

    async def _run(self) -> None:
        while not (self._closing and self._written == self._received):
            await self._pending.wait()
            self._pending.clear()
            count = self._received
            if count > self._written:
                await self._context.write(tensor_pb2.StreamAck(tensors_received=count))
                self._written = count
