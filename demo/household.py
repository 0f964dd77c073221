"""The household demo: three daemons on this machine form a household the way real devices would.

1. `cetd init` creates the household on device "desk"; its daemon starts.
2. `cetctl invite` prints a token; `cetd join TOKEN` admits "laptop" (found over mDNS, CA pinned by the token).
3. "pi" starts with no identity: it asks to join, the owner approves it with `cetctl devices approve`.
4. `cetctl peers` shows the household; the coordinator is killed (-9); the others elect a new one.

Everything is real: processes, mDNS on 127.0.0.1 only, mutual TLS, gRPC. Files live under .demo/.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

from rich.console import Console

from tests.integration.rig import REPO, DaemonProcess, wait_until, write_config

console = Console()
ROOT = REPO / ".demo" / "household"


def sh(*argv: str, show: bool = True) -> subprocess.CompletedProcess[str]:
    if show:
        console.print(f"[bold cyan]$ {' '.join(argv)}[/]")
    result = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=REPO, timeout=120)
    if show and result.stdout.strip():
        console.print(result.stdout.rstrip(), highlight=False)
    if result.returncode != 0:
        console.print(f"[red]{result.stderr.strip()}[/]")
        raise SystemExit(result.returncode)
    return result


def daemon(name: str) -> DaemonProcess:
    state = ROOT / name
    config = write_config(ROOT / f"{name}.toml", state_dir=state, name=name, host="127.0.0.1")
    return DaemonProcess(name=name, state_dir=state, config_path=config, log_path=ROOT / f"{name}.log")


def main() -> int:
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    desk, laptop, pi = daemon("desk"), daemon("laptop"), daemon("pi")
    daemons = [desk, laptop, pi]
    try:
        console.rule("1. the first device creates the household")
        sh("cetd", "--state-dir", str(desk.state_dir), "init", "--name", "The Smiths", "--device-name", "desk")
        desk.start()
        desk.wait_ready()

        console.rule("2. a laptop joins with a one-time invite")
        token = json.loads(sh("cetd.cli.cetctl", "--state-dir", str(desk.state_dir), "--json", "invite",
                              "--ttl", "15m").stdout)["token"]
        sh("cetd", "--state-dir", str(laptop.state_dir), "join", token, "--name", "laptop",
           "--interface", "127.0.0.1")
        laptop.start()
        laptop.wait_ready()

        console.rule("3. a Raspberry Pi asks to join; the owner approves it")
        pi.start()
        pending = wait_until(lambda: json.loads(sh("cetd.cli.cetctl", "--state-dir", str(desk.state_dir),
                                                   "--json", "devices", "pending", show=False).stdout),
                             20, interval=0.5, what="pending request")
        sh("cetd.cli.cetctl", "--state-dir", str(desk.state_dir), "devices", "pending")
        sh("cetd.cli.cetctl", "--state-dir", str(laptop.state_dir), "devices", "approve", pending[0]["device_id"])
        pi.wait_ready()

        console.rule("4. the household")
        wait_until(lambda: all(sum(p["state"] == "alive" for p in d.peers()["peers"]) == 3 for d in daemons)
                   and desk.peers()["coordinator_id"], 20, what="all alive with a coordinator")
        sh("cetd.cli.cetctl", "--state-dir", str(pi.state_dir), "peers")

        coordinator_id = desk.peers()["coordinator_id"]
        victim = next(d for d in daemons if d.device_id == coordinator_id)
        survivors = [d for d in daemons if d is not victim]
        console.rule(f"5. kill -9 the coordinator ({victim.name}); the others elect a new one")
        killed = time.monotonic()
        victim.kill(signal.SIGKILL)
        wait_until(lambda: all(d.peers()["coordinator_id"] not in (None, coordinator_id) for d in survivors),
                   15, interval=0.05, what="failover")
        console.print(f"new coordinator after {time.monotonic() - killed:.1f} s")
        sh("cetd.cli.cetctl", "--state-dir", str(survivors[0].state_dir), "peers")
        console.print("[green]demo finished: household formed, joined by token and by approval, survived the "
                      "coordinator's death[/]")
        return 0
    finally:
        for d in daemons:
            d.stop()


if __name__ == "__main__":
    sys.exit(main())
