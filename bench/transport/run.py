"""Benchmark cetd's tensor stream (grpc.aio, mutual TLS) against a raw TLS socket and gloo on loopback.

    python -m bench.transport.run [--sizes 64K,1M,16M] [--rounds 5] [--round-bytes 64M] [--chunk-bytes 1M]

Two processes per transport (sender and receiver) stay up for the whole run; rounds are interleaved
(cetd, tls, gloo, cetd, tls, gloo, ...) so that load from elsewhere on the machine hits all three alike.
A round streams ``round-bytes`` (at least one tensor) of ``size``-byte tensors one way and ends when the
receiver acknowledges the last one. Prints the median throughput per size as a table and writes it
with the raw samples to bench/results/transport.json. The raw TLS socket uses the same certificates and
length-prefixed framing into a fresh buffer per message; gloo is unencrypted and shown for reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc
import torch
from rich.console import Console
from rich.table import Table

from bench.transport.peers import PeerIdentity, WorkerArgs, worker_main
from cetd.identity.ca import certificate_pem, create_household_ca, issue_device_certificate, tls_server_name
from cetd.identity.keys import device_id_from_public_key, generate_private_key, private_key_pem
from cetd.transport.credentials import TlsMaterial
from cetd.transport.tensor_channel import TENSOR_STREAM_OPTIONS

TRANSPORTS = ("cetd", "tls", "gloo")
RESULTS = Path(__file__).resolve().parents[1] / "results" / "transport.json"
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3}


def parse_bytes(text: str) -> int:
    """``"64K"`` -> 65536; plain integers are bytes."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(text[:-1]) * _UNITS[text[-1]] if text[-1] in _UNITS else int(text)


def format_bytes(size: int) -> str:
    for suffix, unit in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {suffix}"
    return f"{size} B"


def _identities(directory: Path) -> list[PeerIdentity]:
    ca_key, ca_cert = create_household_ca()
    ca_pem = certificate_pem(ca_cert)
    (directory / "ca.pem").write_bytes(ca_pem)
    identities = []
    for index in range(2):
        key = generate_private_key()
        cert = issue_device_certificate(ca_key, ca_cert, key.public_key(), name=f"bench-{index}")
        tls = TlsMaterial(key_pem=private_key_pem(key), cert_chain_pem=certificate_pem(cert) + ca_pem, ca_pem=ca_pem)
        key_file, chain_file = directory / f"key{index}.pem", directory / f"chain{index}.pem"
        key_file.write_bytes(tls.key_pem)
        chain_file.write_bytes(tls.cert_chain_pem)
        identities.append(
            PeerIdentity(
                tls=tls, tls_name=tls_server_name(device_id_from_public_key(key.public_key())),
                key_file=key_file, chain_file=chain_file, ca_file=directory / "ca.pem",
            )
        )
    return identities


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Pair:
    """The sender and receiver processes of one transport."""

    def __init__(self, transport: str, identities: list[PeerIdentity], chunk_bytes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.transport = transport
        self.controls: list[Connection] = []
        self.processes: list[BaseProcess] = []
        port = _free_port()
        for index, role in enumerate(("send", "recv")):
            args = WorkerArgs(transport=transport, role=role, me=identities[index], peer=identities[1 - index],
                              gloo_port=port, chunk_bytes=chunk_bytes)
            mine, theirs = context.Pipe()
            process = context.Process(target=worker_main, args=(args, theirs), daemon=True, name=f"{transport}-{role}")
            process.start()
            self.controls.append(mine)
            self.processes.append(process)
        sender, receiver = self.controls
        send_address, recv_address = sender.recv(), receiver.recv()  # each side's listening address
        sender.send(recv_address)
        receiver.send(send_address)
        for control in self.controls:
            if control.recv() != "ready":
                raise RuntimeError(f"{transport} worker failed to start")

    def run_round(self, size: int, count: int) -> float:
        for control in self.controls:
            control.send((size, count))
        elapsed: float = self.controls[0].recv()
        self.controls[1].recv()
        return elapsed

    def close(self) -> None:
        for control in self.controls:
            with contextlib.suppress(OSError):
                control.send(None)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64K,256K,1M,4M,16M,64M", help="tensor sizes, comma separated")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per size and transport")
    parser.add_argument("--round-bytes", default="64M", help="bytes streamed per round")
    parser.add_argument("--chunk-bytes", default="1M", help="cetd chunk size")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="subset of cetd,tls,gloo")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sizes = [parse_bytes(s) for s in args.sizes.split(",")]
    round_bytes = parse_bytes(args.round_bytes)
    chunk_bytes = parse_bytes(args.chunk_bytes)
    transports = [t for t in args.transports.split(",") if t]
    console = Console()
    samples: dict[str, dict[int, list[float]]] = {t: {s: [] for s in sizes} for t in transports}
    with tempfile.TemporaryDirectory() as directory:
        identities = _identities(Path(directory))
        pairs = [_Pair(transport, identities, chunk_bytes) for transport in transports]
        try:
            for size in sizes:
                count = max(1, round_bytes // size)
                for pair in pairs:
                    pair.run_round(size, count)  # warm-up: connections, allocator, caches
                for _ in range(args.rounds):
                    for pair in pairs:
                        samples[pair.transport][size].append(size * count / pair.run_round(size, count) / 1e9)
                console.print(f"{format_bytes(size)}: " + ", ".join(
                    f"{t} {statistics.median(samples[t][size]):.3f} GB/s" for t in transports))
        finally:
            for pair in pairs:
                pair.close()
    medians = {t: {s: statistics.median(v) for s, v in by_size.items()} for t, by_size in samples.items()}
    table = Table(title="Loopback tensor throughput, median GB/s (1 GB = 1e9 bytes)")
    table.add_column("size", justify="right")
    for transport in transports:
        table.add_column(transport, justify="right")
    has_ratio = {"cetd", "tls"} <= set(transports)
    if has_ratio:
        table.add_column("cetd / tls", justify="right")
    rows = []
    for size in sizes:
        row: dict[str, object] = {"size_bytes": size, **{f"{t}_gbps": round(medians[t][size], 4) for t in transports}}
        cells = [format_bytes(size), *(f"{medians[t][size]:.3f}" for t in transports)]
        if has_ratio:
            ratio = medians["cetd"][size] / medians["tls"][size]
            row["cetd_vs_tls"] = round(ratio, 3)
            cells.append(f"{ratio:.2f}x")
        table.add_row(*cells)
        rows.append(row)
    console.print(table)
    report = {
        "benchmark": "bench.transport.run",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "grpcio": grpc.__version__},
        "settings": {"rounds": args.rounds, "round_bytes": round_bytes, "chunk_bytes": chunk_bytes,
                     "grpc_options": [list(option) for option in TENSOR_STREAM_OPTIONS]},
        "results": rows,
        "samples_gbps": {t: {str(s): [round(v, 4) for v in vs] for s, vs in by_size.items()} for t, by_size in samples.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
