"""`cetd`: run the daemon, create a household, or join one.

    cetd init --name "Our house" [--state-dir DIR]     first device: household CA + this device
    cetd join TOKEN [--peer HOST:PORT]                   join with an invite from `cetctl invite`
    cetd run [--config FILE]                             the daemon (what systemd starts)
    cetd id                                              print this device's ID

Exit codes as in `cetctl`: 0 ok, 69 unreachable, 77 not authorized / bad token, 78 bad configuration.
"""

from __future__ import annotations

import os

# The daemon starts job processes (fork + exec). gRPC's fork handlers would run in the child between
# fork and exec and can abort it while other threads are inside gRPC; the child only execs, so they are
# not needed. Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from cetd.daemon.capabilities import detect_capabilities
from cetd.daemon.config import Config, load_config
from cetd.daemon.daemon import enrollment_candidates, run_daemon
from cetd.daemon.joining import join_household
from cetd.daemon.logs import setup_logging
from cetd.errors import CetdError
from cetd.identity import JoinToken, StateDir, init_household, load_identity

from .cetctl import run_async


def _config(args: argparse.Namespace) -> Config:
    overrides: dict[str, object] = {}
    for flag, key in (
        ("state_dir", "daemon.state_dir"), ("name", "daemon.name"), ("port", "daemon.port"),
        ("enroll_port", "daemon.enroll_port"), ("listen_host", "daemon.listen_host"),
        ("advertise_host", "daemon.advertise_host"), ("log_level", "daemon.log_level"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = str(value.resolve()) if isinstance(value, Path) else value
    if getattr(args, "interface", None):
        overrides["discovery.interfaces"] = list(args.interface)
    if getattr(args, "peer", None):
        overrides["discovery.static_peers"] = list(args.peer)
    if getattr(args, "no_mdns", False):
        overrides["discovery.mdns"] = False
    return load_config(args.config, overrides)


def _print(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if args.json else text)


def cmd_init(args: argparse.Namespace) -> int:
    config = _config(args)
    identity = init_household(StateDir(config.daemon.state_dir), args.device_name or config.daemon.device_name,
                              household_name=args.household_name)
    _print(args, {"device_id": identity.device_id, "household_id": identity.household_id,
                  "state_dir": str(config.daemon.state_dir)},
           f"household {identity.household_id} created; this device is {identity.device_id}\n"
           f"start the daemon (systemctl enable --now cetd), then invite devices with `cetctl invite`")
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    config = _config(args)
    token = JoinToken.decode(args.token)
    state = StateDir(config.daemon.state_dir)
    caps = detect_capabilities(rank_override=float(config.device.rank),
                               memory_limit_bytes=config.device.memory_limit_bytes)

    async def join() -> int:
        async with enrollment_candidates(config) as found:
            static = list(config.discovery.static_peer_addresses)

            async def candidates() -> list[tuple[str, int]]:
                return static + found()

            outcome = await join_household(state, name=config.daemon.device_name, capabilities=caps,
                                           candidates=candidates, token=token,
                                           wait=timedelta(seconds=args.timeout))
        identity = outcome.identity
        _print(args, {"device_id": identity.device_id, "household_id": identity.household_id,
                      "via": outcome.via},
               f"joined household {identity.household_id} as {identity.device_id} (via {outcome.via})")
        return 0

    return run_async(join())


def cmd_run(args: argparse.Namespace) -> int:
    config = _config(args)
    setup_logging(config.daemon.log_level, json_output=config.daemon.log_json)
    return run_async(run_daemon(config))


def cmd_id(args: argparse.Namespace) -> int:
    config = _config(args)
    identity = load_identity(StateDir(config.daemon.state_dir))
    _print(args, {"device_id": identity.device_id, "household_id": identity.household_id,
                  "name": identity.name, "ca_holder": identity.is_ca_holder}, identity.device_id)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cetd", description="The collaborative edge training daemon.")
    parser.add_argument("--config", type=Path, default=None,
                        help="configuration file (default /etc/cetd/cetd.toml, optional)")
    parser.add_argument("--state-dir", type=Path, help="state directory (default /var/lib/cetd)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create a household with this device as its first member")
    init.add_argument("--name", dest="household_name", required=True,
                      help="the household's name (kept on this device only, never advertised)")
    init.add_argument("--device-name", help="this device's name (default: host name)")
    init.set_defaults(handler=cmd_init)

    join = sub.add_parser("join", help="join a household with an invite token")
    join.add_argument("token")
    join.add_argument("--name", help="this device's name (default: host name)")
    join.add_argument("--peer", action="append", metavar="HOST:ENROLL_PORT",
                      help="enrollment endpoint to use instead of (or besides) mDNS")
    join.add_argument("--interface", action="append", metavar="IP", help="mDNS interface address")
    join.add_argument("--no-mdns", action="store_true", help="do not browse mDNS")
    join.add_argument("--timeout", type=float, default=60.0, help="seconds to look for the household")
    join.set_defaults(handler=cmd_join)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--name", help="this device's name (default: host name)")
    run.add_argument("--port", type=int, help="mutual-TLS gRPC port (0 = any)")
    run.add_argument("--enroll-port", type=int, help="enrollment port on the CA holder (0 = any)")
    run.add_argument("--listen-host", help="address to bind")
    run.add_argument("--advertise-host", help="address peers should dial")
    run.add_argument("--interface", action="append", metavar="IP", help="mDNS interface address (repeat)")
    run.add_argument("--peer", action="append", metavar="HOST:PORT", help="static peer (repeat)")
    run.add_argument("--no-mdns", action="store_true", help="no mDNS: static peers only")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(handler=cmd_run)

    sub.add_parser("id", help="print this device's ID").set_defaults(handler=cmd_id)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except CetdError as error:
        print(f"cetd: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
