"""Benchmark cetd's tensor stream (grpc.aio, mutual TLS) against a raw TLS socket and gloo on loopback.

    python -m bench.transport.run [--sizes 64K,1M,16M] [--rounds 9] [--round-bytes 64M] [--check]

Two processes per transport (sender and receiver) stay up for the whole run. Rounds are interleaved,
with the order rotated every round (cetd tls gloo, tls gloo cetd, ...), so that load from elsewhere on
the machine hits all three alike and no transport always runs right after another. A round streams
``round-bytes`` (at least ``min-tensors`` tensors) of ``size``-byte tensors one way and ends when the receiver
confirms the last one.

Reported per size: median throughput per transport; the median of the per-round cetd/tls ratios (each
ratio taken from two adjacent runs, which cancels slow drifts in machine load better than a ratio of
medians) with its range; and the CPU time both processes spent per MiB moved, which depends much less
on other load than throughput does (on a shared 2-core machine, read ratios from several runs).
``--check`` exits 1 when the cetd/tls ratio is below ``--floor`` for a size of at least ``--floor-from``.
Results and raw samples go to bench/results/transport.json.

What is compared: the raw TLS socket uses the same certificates, one blocking thread per process,
length-prefixed messages and a fresh receive buffer per message, as cetd delivers. By default it is
pinned to AES-128-GCM (over TLS 1.2, as Python cannot choose TLS 1.3 suites), the bulk cipher grpc's
BoringSSL negotiates on CPUs with AES instructions; ``--tls-cipher default`` leaves Python's TLS 1.3
AES-256-GCM (14 AES rounds instead of 10; within noise on a CPU with VAES). The negotiated cipher is
printed. gloo is unencrypted and shown for reference only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from cetd.daemon.job_process import JOB_PROCESS_MALLOC

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc
import torch
from rich import box
from rich.console import Console
from rich.table import Table

from bench.transport.peers import PeerIdentity, RoundReport, WorkerArgs, worker_main
from cetd.identity.ca import certificate_pem, create_household_ca, issue_device_certificate, tls_server_name
from cetd.identity.keys import device_id_from_public_key, generate_private_key, private_key_pem
from cetd.transport.credentials import TlsMaterial
from cetd.transport.tensor_channel import TENSOR_STREAM_OPTIONS, TensorChannelConfig

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

    def __init__(self, transport: str, identities: list[PeerIdentity], chunk_bytes: int, tls_aes128: bool) -> None:
        context = multiprocessing.get_context("spawn")
        self.transport = transport
        self.controls: list[Connection] = []
        self.processes: list[BaseProcess] = []
        port = _free_port()
        for index, role in enumerate(("send", "recv")):
            args = WorkerArgs(transport=transport, role=role, me=identities[index], peer=identities[1 - index],
                              gloo_port=port, chunk_bytes=chunk_bytes, tls_aes128=tls_aes128)
            mine, theirs = context.Pipe()
            process = context.Process(target=worker_main, args=(args, theirs), daemon=True, name=f"{transport}-{role}")
            process.start()
            self.controls.append(mine)
            self.processes.append(process)
        sender, receiver = self.controls
        send_address, recv_address = sender.recv(), receiver.recv()  # each side's listening address
        sender.send(recv_address)
        receiver.send(send_address)
        self.description = ""
        for control in self.controls:
            status, self.description = control.recv()
            if status != "ready":
                raise RuntimeError(f"{transport} worker failed to start")

    def run_round(self, size: int, count: int) -> tuple[float, float]:
        """Stream ``count`` tensors of ``size`` bytes; return (wall seconds, CPU seconds of both processes)."""
        for control in self.controls:
            control.send((size, count))
        sent: RoundReport = self.controls[0].recv()
        received: RoundReport = self.controls[1].recv()
        return sent.elapsed_s, sent.cpu_s + received.cpu_s

    def close(self) -> None:
        for control in self.controls:
            with contextlib.suppress(OSError):
                control.send(None)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)


@dataclass(slots=True)
class _Samples:
    """Per-round measurements of one transport at one size."""

    gbps: list[float]
    cpu_ms_per_mib: list[float]


def _measure(pairs: list[_Pair], size: int, count: int, rounds: int) -> dict[str, _Samples]:
    samples = {pair.transport: _Samples(gbps=[], cpu_ms_per_mib=[]) for pair in pairs}
    for pair in pairs:
        pair.run_round(size, count)  # warm-up: connections, allocator, caches
    moved = size * count
    for round_index in range(rounds):
        shift = round_index % len(pairs)
        for pair in pairs[shift:] + pairs[:shift]:
            elapsed, cpu = pair.run_round(size, count)
            samples[pair.transport].gbps.append(moved / elapsed / 1e9)
            samples[pair.transport].cpu_ms_per_mib.append(cpu * 1e3 / (moved / 1024**2))
    return samples


@dataclass(frozen=True, slots=True, kw_only=True)
class SizeResult:
    """The summary of one tensor size."""

    size_bytes: int
    gbps: dict[str, float]
    """Median throughput per transport."""
    cpu_ms_per_mib: dict[str, float]
    """Median CPU milliseconds (sender and receiver processes together) per MiB moved, per transport."""
    cetd_vs_tls: float | None = None
    """Median of the per-round cetd/tls throughput ratios."""
    cetd_vs_tls_range: tuple[float, float] | None = None
    meets_floor: bool | None = None
    """Whether the ratio reaches the floor; None below the sizes the floor applies to."""


def _summarize(size: int, samples: dict[str, _Samples], floor: float, floor_from: int) -> SizeResult:
    gbps = {t: round(statistics.median(m.gbps), 4) for t, m in samples.items()}
    cpu = {t: round(statistics.median(m.cpu_ms_per_mib), 3) for t, m in samples.items()}
    if "cetd" not in samples or "tls" not in samples:
        return SizeResult(size_bytes=size, gbps=gbps, cpu_ms_per_mib=cpu)
    ratios = [c / t for c, t in zip(samples["cetd"].gbps, samples["tls"].gbps, strict=True)]
    ratio = statistics.median(ratios)
    return SizeResult(
        size_bytes=size, gbps=gbps, cpu_ms_per_mib=cpu, cetd_vs_tls=round(ratio, 3),
        cetd_vs_tls_range=(round(min(ratios), 3), round(max(ratios), 3)),
        meets_floor=ratio >= floor if size >= floor_from else None,
    )


def _table(results: list[SizeResult], transports: list[str], floor: float) -> Table:
    table = Table(
        title="Loopback tensor throughput", box=box.SIMPLE_HEAVY, padding=(0, 1), pad_edge=False,
    )
    table.add_column("size", justify="right")
    for transport in transports:
        table.add_column(f"{transport}\nGB/s", justify="right")
    has_ratio = {"cetd", "tls"} <= set(transports)
    if has_ratio:
        table.add_column("cetd/\ntls", justify="right")
        table.add_column("ratio\nrange", justify="right")
        table.add_column(f">={floor:g}x", justify="center")
    for transport in transports:
        table.add_column(f"{transport}\nCPU", justify="right")
    for result in results:
        cells = [format_bytes(result.size_bytes).replace(" ", ""), *(f"{result.gbps[t]:.3f}" for t in transports)]
        if result.cetd_vs_tls is not None and result.cetd_vs_tls_range is not None:
            low, high = result.cetd_vs_tls_range
            verdict = "" if result.meets_floor is None else ("yes" if result.meets_floor else "NO")
            cells += [f"{result.cetd_vs_tls:.2f}x", f"{low:.2f}-{high:.2f}", verdict]
        cells += [f"{result.cpu_ms_per_mib[t]:.2f}" for t in transports]
        table.add_row(*cells)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64K,256K,1M,4M,16M,64M", help="tensor sizes, comma separated")
    parser.add_argument("--rounds", type=int, default=9, help="measured rounds per size and transport")
    parser.add_argument("--round-bytes", default="64M", help="bytes streamed per round")
    parser.add_argument("--min-tensors", type=int, default=4, help="fewest tensors per round (for large sizes)")
    parser.add_argument("--chunk-bytes", default=str(TensorChannelConfig().chunk_bytes),
                        help="cetd chunk size (default: TensorChannelConfig's)")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="subset of cetd,tls,gloo")
    parser.add_argument("--floor", type=float, default=0.6, help="least acceptable cetd/tls ratio")
    parser.add_argument("--floor-from", default="1M", help="smallest size the floor applies to")
    parser.add_argument("--check", action="store_true", help="exit 1 when a size misses the floor")
    parser.add_argument("--tls-cipher", choices=("aes128", "default"), default="aes128",
                        help="raw TLS: AES-128-GCM like grpc (TLS 1.2), or Python's default (TLS 1.3 AES-256-GCM)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    # Every contender runs with the allocator settings cetd gives its job processes (a fair comparison).
    for name, value in JOB_PROCESS_MALLOC.items():
        os.environ.setdefault(name, value)
    sizes = [parse_bytes(s) for s in args.sizes.split(",")]
    round_bytes = parse_bytes(args.round_bytes)
    chunk_bytes = parse_bytes(args.chunk_bytes)
    floor_from = parse_bytes(args.floor_from)
    transports = [t for t in args.transports.split(",") if t]
    console = Console(width=max(Console().width, 100))  # the table needs about 90 columns
    load_before = os.getloadavg()
    started = time.monotonic()
    results: list[SizeResult] = []
    raw: dict[str, dict[str, dict[str, list[float]]]] = {t: {} for t in transports}
    with tempfile.TemporaryDirectory() as directory:
        identities = _identities(Path(directory))
        pairs = [_Pair(transport, identities, chunk_bytes, args.tls_cipher == "aes128") for transport in transports]
        try:
            for size in sizes:
                samples = _measure(pairs, size, max(args.min_tensors, round_bytes // size), args.rounds)
                result = _summarize(size, samples, args.floor, floor_from)
                results.append(result)
                for transport, measured in samples.items():
                    raw[transport][str(size)] = {"gbps": [round(v, 4) for v in measured.gbps],
                                                 "cpu_ms_per_mib": [round(v, 3) for v in measured.cpu_ms_per_mib]}
                speeds = ", ".join(f"{t} {result.gbps[t]:.3f} GB/s" for t in transports)
                ratio = "" if result.cetd_vs_tls is None else f", cetd/tls {result.cetd_vs_tls:.2f}x"
                console.print(f"{format_bytes(size)}: {speeds}{ratio}")
            descriptions = {pair.transport: pair.description for pair in pairs}
        finally:
            for pair in pairs:
                pair.close()
    console.print(_table(results, transports, args.floor))
    console.print("  GB/s: median (1 GB = 1e9 B); cetd/tls: median of the per-round ratios, and their range;")
    console.print("  CPU: median ms of CPU time (sender and receiver processes, all threads) per MiB moved")
    for transport, description in descriptions.items():
        console.print(f"  {transport}: {description}")
    load_after = os.getloadavg()
    console.print(f"  {time.monotonic() - started:.0f} s; load average {load_before[0]:.2f} before, "
                  f"{load_after[0]:.2f} after, on {os.cpu_count()} CPUs")
    report = {
        "benchmark": "bench.transport.run",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "grpcio": grpc.__version__,
                    "load_average_before": round(load_before[0], 2), "load_average_after": round(load_after[0], 2)},
        "settings": {"rounds": args.rounds, "round_bytes": round_bytes, "min_tensors": args.min_tensors,
                     "chunk_bytes": chunk_bytes,
                     "tls_cipher": args.tls_cipher,
                     "floor": args.floor, "floor_from_bytes": floor_from,
                     "grpc_options": [list(option) for option in TENSOR_STREAM_OPTIONS]},
        "transports": descriptions,
        "results": [dataclasses.asdict(result) for result in results],
        "samples": raw,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"written to {args.output}")
    missed = [format_bytes(result.size_bytes) for result in results if result.meets_floor is False]
    if args.check and missed:
        console.print(f"cetd is below {args.floor:g}x the raw TLS socket at {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
