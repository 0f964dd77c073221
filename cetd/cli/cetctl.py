"""`cetctl`: the household's control client (peers, invites, device approval and revocation).

Exit codes: 0 success, 1 generic failure, 65 a job was refused or failed, 69 the daemon or peer is
unreachable, 75 stale coordinator term, 77 not authorized / bad token, 78 bad configuration or usage.
Expected failures print one line on stderr, never a traceback; ``--json`` prints machine output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cetd.errors import CetdError, ConfigError
from cetd.identity import short_id
from cetd.ids import DeviceId
from cetd.transport.household_client import PeerClient
from cetd.transport.peer_info import HouseholdView, PeerStatus

from .connect import open_client
from .train import add_job_commands

DEFAULT_STATE_DIR = Path(os.environ.get("CETD_STATE_DIR", "/var/lib/cetd"))

Handler = Callable[[PeerClient, argparse.Namespace], Awaitable[int]]


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``2d`` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ConfigError(f"'{text}' is not a duration (use e.g. 90s, 15m, 1h, 2d)")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return timedelta(seconds=value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


def _emit(args: argparse.Namespace, data: Any, human: Callable[[Console], None]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        human(Console())


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n else "-"


def _peer_row(p: PeerStatus) -> dict[str, Any]:
    return {
        "device_id": p.info.device_id,
        "name": p.info.name,
        "address": p.info.address,
        "state": p.state,
        "role": p.role,
        "term": p.term,
        "last_seen_s": round(p.last_seen_s, 3),
        "capabilities": asdict(p.info.capabilities),
        "verification_code": p.verification_code,
        "ca_holder": bool(p.info.enroll_address),
        "link": {"bandwidth_bytes_per_second": p.bandwidth_bytes_per_second, "latency_seconds": p.latency_seconds},
    }


def view_as_dict(view: HouseholdView) -> dict[str, Any]:
    return {
        "self_id": view.self_id,
        "term": view.term,
        "coordinator_id": view.coordinator_id,
        "roster_version": view.roster_version,
        "peers": [_peer_row(p) for p in view.peers],
        "links": [asdict(link) for link in view.links],
    }


async def cmd_peers(client: PeerClient, args: argparse.Namespace) -> int:
    view = await client.list_peers()

    def human(console: Console) -> None:
        table = Table(title=f"household — term {view.term}, roster v{view.roster_version}")
        for column in ("device", "name", "address", "state", "role", "cores", "memory", "free", "accel", "block ms",
                       "link MB/s", "power", "seen"):
            table.add_column(column, no_wrap=column in ("device", "address"))
        for p in view.peers:
            caps = p.info.capabilities
            me = " (this)" if p.info.device_id == view.self_id else ""
            table.add_row(
                short_id(p.info.device_id) + me, p.info.name, p.info.address or "-", p.state, p.role,
                str(caps.cores or "-"), _gib(caps.memory_bytes), _gib(caps.free_memory_bytes),
                caps.accelerator or "-",
                f"{caps.block_seconds * 1000:.1f}" if caps.block_seconds else "-",
                f"{p.bandwidth_bytes_per_second / 1e6:.0f}" if p.bandwidth_bytes_per_second else "-",
                caps.power_profile or "-",
                "-" if p.last_seen_s < 0 else f"{p.last_seen_s:.1f}s ago",
            )
        console.print(table)
        if view.links:
            links = Table(title="links between devices")
            for column in ("devices", "MB/s", "latency ms", "measured by"):
                links.add_column(column, no_wrap=column == "devices")
            for link in view.links:
                links.add_row(f"{short_id(link.a)} – {short_id(link.b)}", f"{link.bandwidth_bytes_per_second / 1e6:.0f}",
                              f"{link.latency_seconds * 1e3:.2f}",
                              ", ".join(map(short_id, link.measured_by)) or "inferred (both ends' links to this device)")
            console.print(links)

    _emit(args, view_as_dict(view), human)
    return 0


async def cmd_invite(client: PeerClient, args: argparse.Namespace) -> int:
    token, expires_at = await client.create_invite(parse_duration(args.ttl))
    _emit(args, {"token": token, "expires_at": expires_at},
          lambda c: c.print(f"{token}\n[dim]one-time, expires in {args.ttl}; on the new device: "
                            f"cetd join TOKEN[/dim]", soft_wrap=True))
    return 0


async def cmd_pending(client: PeerClient, args: argparse.Namespace) -> int:
    pending = await client.list_pending()

    def human(console: Console) -> None:
        if not pending:
            console.print("no device is waiting for approval")
            return
        table = Table(title="waiting for approval")
        for column in ("device", "name", "from", "verification code"):
            table.add_column(column)
        for p in pending:
            table.add_row(p.info.device_id, p.info.name, p.info.address, p.verification_code)
        console.print(table)

    _emit(args, [_peer_row(p) for p in pending], human)
    return 0


async def cmd_approve(client: PeerClient, args: argparse.Namespace) -> int:
    version = await client.approve(DeviceId(args.device_id))
    _emit(args, {"device_id": args.device_id, "roster_version": version},
          lambda c: c.print(f"device {args.device_id} approved (roster v{version})"))
    return 0


async def cmd_revoke(client: PeerClient, args: argparse.Namespace) -> int:
    version = await client.revoke(DeviceId(args.device_id))
    _emit(args, {"device_id": args.device_id, "roster_version": version},
          lambda c: c.print(f"device {args.device_id} revoked (roster v{version})"))
    return 0


async def cmd_drain(client: PeerClient, args: argparse.Namespace) -> int:
    from cetd.transport.jobs_service import JobsClient

    moved = await JobsClient(client.channel, client.address).drain(args.device_id)
    _emit(args, {"device_id": args.device_id, "jobs_moved": moved},
          lambda c: c.print(f"device {args.device_id} drained; jobs moved off it: {', '.join(moved) or 'none'}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cetctl", description="Control a cetd household.")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="this device's cetd state directory (identity used to authenticate)")
    parser.add_argument("--address", help="host:port of the member to talk to (default: the local daemon)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("peers", help="every member with state, role, term and capabilities").set_defaults(
        handler=cmd_peers)
    invite = sub.add_parser("invite", help="print a one-time join token")
    invite.add_argument("--ttl", default="1h", help="how long the token stays valid (default 1h)")
    invite.set_defaults(handler=cmd_invite)
    devices = sub.add_parser("devices", help="pending, approve, revoke").add_subparsers(
        dest="devices_command", required=True)
    devices.add_parser("pending", help="devices waiting for owner approval").set_defaults(handler=cmd_pending)
    approve = devices.add_parser("approve", help="admit a pending device")
    approve.add_argument("device_id")
    approve.set_defaults(handler=cmd_approve)
    drain = devices.add_parser("drain", help="move running jobs off a device and keep it out of new plans")
    drain.add_argument("device_id")
    drain.set_defaults(handler=cmd_drain)
    revoke = devices.add_parser("revoke", help="revoke a member for good")
    revoke.add_argument("device_id")
    revoke.set_defaults(handler=cmd_revoke)
    add_job_commands(sub)
    return parser


def run_async(main: Coroutine[Any, Any, int]) -> int:
    """Run a coroutine on uvloop when available (every target but Windows has it)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler

    async def call() -> int:
        client = open_client(args.state_dir.resolve(), args.address)
        async with client:
            return await handler(client, args)

    try:
        return run_async(call())
    except CetdError as error:
        print(f"cetctl: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
