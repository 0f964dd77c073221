"""`GrpcPeerChannel`: the runtime's `PeerChannel` over grpc.aio streams with mutual TLS.

The runtime calls `send` and `recv` synchronously from its compute thread; the channel runs its own
asyncio event loop (uvloop where installed) on a background thread that owns the grpc.aio server this
worker receives on and one client channel and one long-lived stream per peer it sends to. `send`
returns at once and the bytes move on the loop thread while the caller computes; `recv` blocks on the
inbox the server fills, without a round trip through the loop. A worker creates its channel in a
freshly spawned process and never forks afterwards: live gRPC streams do not survive a fork.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import grpc
import torch

from cetd.ids import JobId
from cetd.transport.channel import TensorKey, TensorSpec, TransportError
from cetd.transport.credentials import (
    TlsMaterial,
    channel_options,
    mutual_tls_channel_credentials,
    mutual_tls_server_credentials,
    server_options,
)
from cetd.transport.tensor_codec import (
    ALLOWED_DTYPES,
    StreamOpening,
    check_spec,
    describe_key,
    dtype_name,
    tensor_bytes,
)
from cetd.transport.tensor_sender import PeerSender, SendItem
from cetd.transport.tensor_server import EXCHANGE_METHOD, TensorInbox, TensorStreamServicer
from cetd.wire import tensor_pb2

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_MIB = 1024 * 1024

TENSOR_STREAM_OPTIONS: list[tuple[str, object]] = [
    # Bulk data: the largest HTTP/2 frames cut per-frame work; compression would only cost CPU.
    ("grpc.http2.max_frame_size", 16 * _MIB - 1),
    ("grpc.default_compression_algorithm", 0),
    ("grpc.http2.bdp_probe", 1),
]
"""grpc options added to `credentials`' ones for tensor streams (measured in bench/transport)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorChannelConfig:
    """How a `GrpcPeerChannel` moves tensors."""

    chunk_bytes: int = _MIB // 2
    """Payload of one chunk frame; must stay below the gRPC message limit. 512 KiB measured cheapest per
    byte for 1 MiB tensors (bench/transport): frames of 1 MiB and more make glibc return and refault
    memory on every message, unless the process raises its malloc mmap and trim thresholds."""
    max_tensor_bytes: int = 1024 * _MIB
    """Largest tensor a peer may announce; larger announcements end its stream."""
    inbox_bytes: int = 256 * _MIB
    """Received-but-unclaimed bytes per sender before its stream is paused (one tensor always fits)."""
    inbox_tensors: int = 4096
    """Received-but-unclaimed tensors per sender before its stream is paused."""
    timeout: timedelta = timedelta(seconds=60)
    """Default for `recv` and `SendHandle.wait`: how long a silent or unreachable peer is waited for."""
    close_grace: timedelta = timedelta(seconds=5)
    """How long `close` waits for queued tensors to be acknowledged."""
    checksum: bool = False
    """Send a CRC-32 of every tensor (TLS already protects integrity on the wire)."""
    use_uvloop: bool = True
    """Run the channel's event loop on uvloop when it is installed."""

    def __post_init__(self) -> None:
        if not 0 < self.chunk_bytes <= 4 * _MIB:
            raise ValueError(f"chunk_bytes must be in (0, 4 MiB], got {self.chunk_bytes}")
        if self.max_tensor_bytes <= 0 or self.inbox_bytes <= 0 or self.inbox_tensors <= 0:
            raise ValueError("max_tensor_bytes, inbox_bytes and inbox_tensors must be positive")
        if self.timeout <= timedelta(0):
            raise ValueError(f"timeout must be positive, got {self.timeout}")


class _FutureSendHandle:
    """A `SendHandle` completed by the receiver's acknowledgement."""

    def __init__(self, future: concurrent.futures.Future[None], *, peer: int, key: TensorKey, timeout: float):
        self._future = future
        self._peer = peer
        self._key = key
        self._timeout = timeout

    def wait(self, timeout: float | None = None) -> None:
        """Block until the peer acknowledged the tensor; ``None`` waits the channel's configured timeout.

        Raises:
            TransportError: the stream failed, the peer was unreachable, or the time ran out.
        """
        limit = self._timeout if timeout is None else timeout
        try:
            self._future.result(limit)
        except concurrent.futures.TimeoutError:
            raise TransportError(
                f"peer rank {self._peer} did not take {describe_key(self._key)} within {limit:g} s"
            ) from None
        except concurrent.futures.CancelledError:
            raise TransportError(f"the channel was closed before {describe_key(self._key)} was sent") from None


def _new_event_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class GrpcPeerChannel:
    """A `PeerChannel` for one worker of one job, receiving on its own mutual-TLS gRPC server.

    Args:
        rank: this worker's rank.
        world_size: number of workers in the job.
        job_id: the job; streams for another job are refused.
        tls: this device's identity, presented by the server and by every client channel.
        authorize: called with the PEM certificate of every peer that opens a stream; False refuses it
            with PERMISSION_DENIED (the daemon checks membership and revocation here).
        host: address to listen on.
        port: port to listen on; 0 picks a free one (see `port`).
        config: chunking, limits and timeouts.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        job_id: JobId,
        tls: TlsMaterial,
        authorize: Callable[[bytes], bool],
        host: str = "127.0.0.1",
        port: int = 0,
        config: TensorChannelConfig | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self._rank = rank
        self._world_size = world_size
        self._job_id = job_id
        self._tls = tls
        self._config = config or TensorChannelConfig()
        self._timeout_s = self._config.timeout.total_seconds()
        self._peer_names: dict[int, str] | None = None
        self._senders: dict[int, PeerSender] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._closed = False
        self._abort_reason: str | None = None
        self._loop = _new_event_loop(self._config.use_uvloop)
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"cetd-tensors-{rank}", daemon=True)
        self._thread.start()
        self._inbox = TensorInbox(
            world_size=world_size, max_bytes=self._config.inbox_bytes, max_count=self._config.inbox_tensors
        )
        servicer = TensorStreamServicer(
            rank=rank,
            world_size=world_size,
            job_id=job_id,
            authorize=authorize,
            inbox=self._inbox,
            max_tensor_bytes=self._config.max_tensor_bytes,
            peer_names=lambda: self._peer_names,
        )
        try:
            self._server, self._port = self._run(self._start_server(servicer, host, port))
        except BaseException:
            self._stop_loop()
            raise
        self._host = host

    @property
    def rank(self) -> int:
        """This worker's rank in the job."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of workers in the job."""
        return self._world_size

    @property
    def port(self) -> int:
        """The port the server listens on (the one picked when 0 was asked for)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` that peers dial."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._port}"

    def connect(self, peers: Mapping[int, tuple[str, str]]) -> None:
        """Set the peers to send to: rank -> (``host:port``, TLS server name in its certificate).

        The TLS names also bind ranks to certificates on receipt: a stream claiming rank r must come
        from a certificate naming peers[r]'s TLS name, and streams are refused as unavailable (the
        sender retries) until this is called. Connections are opened lazily by the first send.
        """
        self._check_open()
        if self._peer_names is not None:
            raise TransportError("connect was already called on this channel")
        unknown = sorted(r for r in peers if not 0 <= r < self._world_size or r == self._rank)
        if unknown:
            raise ValueError(f"ranks {unknown} are not peers of rank {self._rank} in a world of {self._world_size}")
        self._run(self._connect(dict(peers)))

    def send(self, peer: int, key: TensorKey, tensor: torch.Tensor) -> _FutureSendHandle:
        """Queue ``tensor`` for ``peer``; it is read on the channel's thread until the handle completes."""
        if self._abort_reason is not None:
            raise TransportError(f"the channel was aborted ({self._abort_reason}); nothing more is sent")
        sender = self._senders.get(peer)
        if sender is None:
            self._check_open()
            raise TransportError(f"rank {self._rank} has no connection to peer rank {peer} (connect first)")
        if dtype_name(tensor.dtype) not in ALLOWED_DTYPES:
            raise TransportError(f"{describe_key(key)} has dtype {tensor.dtype}, which cannot be sent")
        data = tensor_bytes(tensor)
        if data.nbytes > self._config.max_tensor_bytes:
            raise TransportError(
                f"{describe_key(key)} takes {data.nbytes} bytes, more than the "
                f"{self._config.max_tensor_bytes} a peer accepts"
            )
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        item = SendItem(key=key, tensor=tensor, data=data, done=done, deadline=time.monotonic() + self._timeout_s)
        self._check_open()
        sender.submit(item)
        return _FutureSendHandle(done, peer=peer, key=key, timeout=self._timeout_s)

    def recv(self, peer: int, key: TensorKey, spec: TensorSpec, timeout: float | None = None) -> torch.Tensor:
        """Block until ``peer`` sent ``key``; ``None`` waits the channel's configured timeout.

        Raises:
            TransportError: the tensor is not ``spec``, the peer's stream ended, or the time ran out.
        """
        self._check_open()
        if not 0 <= peer < self._world_size or peer == self._rank:
            raise TransportError(f"rank {peer} is not a peer of rank {self._rank}")
        limit = self._timeout_s if timeout is None else timeout
        tensor = self._inbox.take(peer, key, limit).tensor()
        check_spec(peer, key, tensor, spec)
        return tensor

    def abort(self, reason: str) -> None:
        """End every waiting and later `recv` now, and make `close` drop unsent tensors instead of
        flushing them: a peer is known to be dead (its heartbeats stopped) or the job is being torn down.
        Thread-safe."""
        if self._abort_reason is None:
            self._abort_reason = reason
            logger.warning("tensor channel of rank %d aborted: %s", self._rank, reason)
        self._inbox.close()

    def close(self) -> None:
        """Flush queued sends (for at most ``config.close_grace``), stop the server and the loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._shutdown(), timeout=self._config.close_grace.total_seconds() + 5)
        except Exception:
            logger.exception("tensor channel of rank %d did not shut down cleanly", self._rank)
        finally:
            self._inbox.close()
            self._stop_loop()

    def __enter__(self) -> GrpcPeerChannel:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"the tensor channel of rank {self._rank} is closed")

    def _run(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _start_server(self, servicer: TensorStreamServicer, host: str, port: int) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=[*server_options(), *TENSOR_STREAM_OPTIONS])
        server.add_generic_rpc_handlers((servicer.handler(),))
        bound = server.add_secure_port(f"{host}:{port}", mutual_tls_server_credentials(self._tls))
        if bound == 0:
            raise TransportError(f"could not listen on {host}:{port}")
        await server.start()
        return server, bound

    async def _connect(self, peers: dict[int, tuple[str, str]]) -> None:
        credentials = mutual_tls_channel_credentials(self._tls)
        for peer, (address, tls_name) in sorted(peers.items()):
            channel = grpc.aio.secure_channel(
                address, credentials, options=[*channel_options(tls_name), *TENSOR_STREAM_OPTIONS]
            )
            self._channels.append(channel)
            method = channel.stream_stream(
                EXCHANGE_METHOD,
                request_serializer=None,  # frames are encoded to bytes by the codec
                response_deserializer=tensor_pb2.StreamAck.FromString,
            )
            self._senders[peer] = PeerSender(
                opening=StreamOpening(job_id=self._job_id, sender_rank=self._rank, receiver_rank=peer),
                address=address,
                open_call=functools.partial(method, None),
                chunk_bytes=self._config.chunk_bytes,
                checksum=self._config.checksum,
            )
        self._peer_names = {peer: tls_name for peer, (_, tls_name) in peers.items()}

    async def _shutdown(self) -> None:
        grace = 0.0 if self._abort_reason is not None else self._config.close_grace.total_seconds()
        await asyncio.gather(*(sender.close(grace) for sender in self._senders.values()))
        for channel in self._channels:
            await channel.close(None)
        await self._server.stop(grace=0.5)
        current = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not current:
                task.cancel()
