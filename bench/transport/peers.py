"""The benchmark's worker processes: one sender and one receiver per transport, driven over a pipe.

Each worker sets up its transport once, then serves rounds: the orchestrator sends ``(size, count)``
to both workers of a pair, the sender streams ``count`` tensors of ``size`` bytes and the receiver
answers one byte when it holds all of them; the sender reports the elapsed seconds. Both workers also
report the CPU seconds their whole process (every thread) spent on the round, which is far less
sensitive than wall time to other load on a shared machine. Setup is never timed, and idle pairs sleep
on their pipe, so the three transports can be measured in interleaved rounds. Every worker is one
process with torch limited to one thread; cetd's process also runs its event-loop thread and grpc's
own threads, which is its real process model.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from cetd.ids import JobId
from cetd.transport.channel import TensorKey, TensorSpec
from cetd.transport.credentials import TlsMaterial
from cetd.transport.tensor_channel import GrpcPeerChannel, TensorChannelConfig

_LENGTH = struct.Struct("!Q")

RoundRunner = Callable[[int, int, int], float]
"""``(size, count, round_number) -> elapsed seconds`` (0 on the receiving side)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerIdentity:
    """One benchmark process's certificate, as bytes for grpc and as files for Python's ssl."""

    tls: TlsMaterial
    tls_name: str
    key_file: Path
    chain_file: Path
    ca_file: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerArgs:
    """What a worker process needs to set up its side of one transport."""

    transport: str
    """``"cetd"``, ``"tls"`` or ``"gloo"``."""
    role: str
    """``"send"`` or ``"recv"``."""
    me: PeerIdentity
    peer: PeerIdentity
    gloo_port: int
    chunk_bytes: int
    tls_aes128: bool = True
    """Raw TLS only: TLS 1.2 with AES-128-GCM, the bulk cipher grpc's BoringSSL picks on CPUs with AES
    instructions, instead of Python's TLS 1.3 default AES-256-GCM (about 40% more AES rounds per byte)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundReport:
    """What one worker measured in one round."""

    elapsed_s: float
    """Sender: wall seconds from the first send until the receiver confirmed the last tensor; receiver: 0."""
    cpu_s: float
    """CPU seconds (user + system, all threads) the worker's process spent on the round."""


def _payload(size: int) -> torch.Tensor:
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))


def worker_main(args: WorkerArgs, control: Connection) -> None:
    """Entry point of a spawned worker: set up, then serve rounds until told to stop."""
    torch.set_num_threads(1)
    setup: dict[str, Callable[[WorkerArgs, Connection], tuple[RoundRunner, str]]] = {
        "cetd": _cetd, "tls": _raw_tls, "gloo": _gloo,
    }
    run_round, description = setup[args.transport](args, control)
    control.send(("ready", description))
    round_number = 0
    while (command := control.recv()) is not None:
        size, count = command
        cpu_started = time.process_time()
        elapsed = run_round(size, count, round_number)
        control.send(RoundReport(elapsed_s=elapsed, cpu_s=time.process_time() - cpu_started))
        round_number += 1


def _cetd(args: WorkerArgs, control: Connection) -> tuple[RoundRunner, str]:
    rank = 0 if args.role == "send" else 1
    channel = GrpcPeerChannel(
        rank=rank, world_size=2, job_id=JobId("bench"), tls=args.me.tls, authorize=lambda pem: True,
        config=TensorChannelConfig(chunk_bytes=args.chunk_bytes, timeout=timedelta(seconds=120)),
    )
    control.send(channel.address)
    channel.connect({1 - rank: (control.recv(), args.peer.tls_name)})
    done_spec = TensorSpec(dtype=torch.uint8, shape=(1,))

    def send_round(size: int, count: int, round_number: int) -> float:
        tensor = _payload(size)
        started = time.perf_counter()
        handles = [channel.send(1, TensorKey(step=round_number, micro_batch=i, name="x"), tensor) for i in range(count)]
        channel.recv(1, TensorKey(step=round_number, micro_batch=-1, name="done"), done_spec)
        elapsed = time.perf_counter() - started
        for handle in handles:
            handle.wait()
        return elapsed

    def recv_round(size: int, count: int, round_number: int) -> float:
        spec = TensorSpec(dtype=torch.uint8, shape=(size,))
        for i in range(count):
            channel.recv(0, TensorKey(step=round_number, micro_batch=i, name="x"), spec)
        channel.send(0, TensorKey(step=round_number, micro_batch=-1, name="done"), torch.ones(1, dtype=torch.uint8)).wait()
        return 0.0

    return (send_round if rank == 0 else recv_round), "grpc.aio stream, mutual TLS (grpc's BoringSSL)"


def _tls_context(me: PeerIdentity, purpose: ssl.Purpose, *, aes128: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose, cafile=str(me.ca_file))
    context.load_cert_chain(str(me.chain_file), str(me.key_file))
    context.verify_mode = ssl.CERT_REQUIRED
    if aes128:  # Python cannot choose TLS 1.3 suites, so pin the cipher through TLS 1.2
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")
    return context


def _recv_exactly(sock: ssl.SSLSocket, view: memoryview) -> None:
    filled = 0
    while filled < view.nbytes:
        got = sock.recv_into(view[filled:])
        if not got:
            raise ConnectionError("peer closed the socket")
        filled += got


def _raw_tls(args: WorkerArgs, control: Connection) -> tuple[RoundRunner, str]:
    if args.role == "recv":
        listener = socket.create_server(("127.0.0.1", 0))
        control.send(f"127.0.0.1:{listener.getsockname()[1]}")
        control.recv()
        raw, _ = listener.accept()
        sock = _tls_context(args.me, ssl.Purpose.CLIENT_AUTH, aes128=args.tls_aes128).wrap_socket(
            raw, server_side=True
        )
        listener.close()
    else:
        control.send("")
        host, port = control.recv().rsplit(":", 1)
        raw = socket.create_connection((host, int(port)))
        sock = _tls_context(args.me, ssl.Purpose.SERVER_AUTH, aes128=args.tls_aes128).wrap_socket(
            raw, server_hostname=args.peer.tls_name
        )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    header = bytearray(_LENGTH.size)
    ack = bytearray(1)

    def send_round(size: int, count: int, round_number: int) -> float:
        data = _payload(size).numpy().data
        started = time.perf_counter()
        for _ in range(count):
            sock.sendall(_LENGTH.pack(size))
            sock.sendall(data)
        _recv_exactly(sock, memoryview(ack))
        return time.perf_counter() - started

    def recv_round(size: int, count: int, round_number: int) -> float:
        for _ in range(count):
            _recv_exactly(sock, memoryview(header))
            (length,) = _LENGTH.unpack(header)
            buffer = torch.empty(length, dtype=torch.uint8)  # a fresh tensor per message, as cetd delivers
            _recv_exactly(sock, buffer.numpy().data.cast("B"))
        sock.sendall(b"\x01")
        return 0.0

    cipher = sock.cipher()
    description = f"blocking socket, mutual TLS (Python ssl), {sock.version()} {cipher[0] if cipher else '?'}"
    return (send_round if args.role == "send" else recv_round), description


def _gloo(args: WorkerArgs, control: Connection) -> tuple[RoundRunner, str]:
    import torch.distributed as dist

    rank = 0 if args.role == "send" else 1
    control.send("")
    control.recv()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.gloo_port}", rank=rank, world_size=2)
    ack = torch.ones(1, dtype=torch.uint8)

    def send_round(size: int, count: int, round_number: int) -> float:
        tensor = _payload(size)
        started = time.perf_counter()
        for _ in range(count):
            dist.send(tensor, dst=1)
        dist.recv(ack, src=1)
        return time.perf_counter() - started

    def recv_round(size: int, count: int, round_number: int) -> float:
        for _ in range(count):
            dist.recv(torch.empty(size, dtype=torch.uint8), src=0)
        dist.send(ack, dst=0)
        return 0.0

    return (send_round if rank == 0 else recv_round), "torch.distributed gloo send/recv, unencrypted TCP"
