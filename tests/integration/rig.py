"""Test rig: a household of real `cetd run` processes on 127.0.0.1 (or inside namespace hosts).

Each daemon is a separate OS process with its own state directory, bound to port 0; the rig reads the
ports back from ``runtime.json``. mDNS is bound to 127.0.0.1 only (or to the namespace's own address),
so nothing is ever multicast on the machine's real interfaces. Every process is killed on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cetd.identity import (
    Member,
    StateDir,
    certificate_pem,
    init_household,
    issue_device_certificate,
    load_ca_key,
    load_identity,
    load_or_create_device_key,
    load_signed_roster,
    sign_roster,
    store_enrollment,
    store_roster,
    verify_roster,
)
from cetd.ids import DeviceId

REPO = Path(__file__).resolve().parents[2]
_ROLE_LINE = re.compile(r"^(?P<time>\S+ \S+) .*role (?P<role>\w+), term (?P<term>\d+), coordinator (?P<coordinator>\S+)")

HOUSEHOLD_NAME = "The Smith Family"

FAST_MEMBERSHIP = {
    "heartbeat_interval_s": 0.5,
    "suspect_after_s": 1.5,
    "dead_after_s": 3.0,
    "startup_grace_s": 1.5,
}


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last value {last!r}")


def provision_member(ca_dir: Path, member_dir: Path, name: str) -> DeviceId:
    """Admit a device offline, as an approved join would (tests of joining itself use the real RPCs)."""
    ca_state, state = StateDir(ca_dir), StateDir(member_dir)
    ca_identity = load_identity(ca_state)
    ca_key = load_ca_key(ca_state)
    key = load_or_create_device_key(state)
    cert = issue_device_certificate(ca_key, ca_identity.ca_certificate, key.public_key(), name=name)
    roster = verify_roster(load_signed_roster(ca_state), ca_identity.ca_certificate)
    member = Member(device_id=load_identity_id(cert), name=name, added_at=time.time())
    signed = sign_roster(roster.with_member(member), ca_key)
    store_roster(ca_state, signed)
    store_enrollment(state, certificate_pem(cert), ca_identity.ca_pem, signed, name)
    return member.device_id


def load_identity_id(cert: Any) -> DeviceId:
    from cetd.identity import device_id_from_certificate

    return device_id_from_certificate(cert)


def write_config(path: Path, *, state_dir: Path, name: str, host: str, extra: dict[str, dict[str, Any]] | None
                 = None) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "daemon": {"state_dir": str(state_dir), "name": name, "listen_host": host, "port": 0,
                   "enroll_port": 0, "log_level": "info"},
        "discovery": {"interfaces": [host]},
        "membership": dict(FAST_MEMBERSHIP),
        # Background profiling would compete with the timing-sensitive tests for the two cores;
        # tests that need it turn it on.
        "device": {"profile": False},
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class DaemonProcess:
    """One `cetd run` process."""

    name: str
    state_dir: Path
    config_path: Path
    log_path: Path
    host: str = "127.0.0.1"
    prefix: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    device_id: DeviceId | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the daemon (and so its job processes), e.g. fault injection."""

    def start(self) -> None:
        runtime = self.state_dir / "runtime.json"
        runtime.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "cetd", "--config", str(self.config_path), "run"],
            stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=REPO,
            start_new_session=True,
        )

    def runtime(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.state_dir / "runtime.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            return self.runtime()

        runtime: dict[str, Any] = wait_until(ready, timeout, what=f"{self.name} ready")
        self.device_id = DeviceId(runtime["device_id"])
        return runtime

    @property
    def address(self) -> str:
        runtime = self.runtime()
        assert runtime is not None, f"{self.name} is not running"
        return str(runtime["address"])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the daemon (its job processes die with it: they hold PR_SET_PDEATHSIG)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=15)

    def kill_device(self) -> None:
        """The device dies: the daemon and every job process on it, at once (kill -9)."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return
        children = psutil.Process(self.proc.pid).children(recursive=True)
        os.killpg(self.proc.pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        self.proc.wait(timeout=15)

    def job_processes(self) -> list[Any]:
        """The job processes (drivers and workers) this daemon runs now, as `psutil.Process` objects."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return []
        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if "cetd.daemon.worker_main" in child.cmdline():
                    found.append(child)
        return found

    def sees_alive(self, device_id: str | None) -> bool:
        """Whether this daemon's heartbeats currently count ``device_id`` as alive."""
        return any(p["device_id"] == device_id and p["state"] == "alive" for p in self.peers()["peers"])

    def job(self, job_id: str) -> dict[str, Any]:
        """`cetctl status JOB --json`, fetched in-process."""
        import asyncio

        from cetd.cli.connect import open_client
        from cetd.cli.train import status_dict
        from cetd.transport.jobs_service import JobsClient

        async def fetch() -> dict[str, Any]:
            async with open_client(self.state_dir) as client:
                return status_dict(await JobsClient(client.channel, client.address).get(job_id))

        return asyncio.run(fetch())

    def submit(self, *args: str) -> subprocess.Popen[str]:
        """Start `cetctl --json train ARGS` in the background (it watches the job until it ends)."""
        return subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "cetd.cli.cetctl", "--state-dir", str(self.state_dir), "--json",
             "train", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def role_changes(self) -> list[tuple[float, str, int, str]]:
        """(epoch time, role, term, coordinator) of every role change the daemon logged.

        Timings are read from the daemons' own logs rather than by polling them, so that the cost of
        asking (a subprocess per question inside a namespace) never inflates what is measured.
        """
        changes = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = _ROLE_LINE.search(line)
            if match:
                stamp = datetime.strptime(match["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                changes.append((stamp, match["role"], int(match["term"]), match["coordinator"]))
        return changes

    def started_serving(self) -> float:
        """Epoch time of the last "serving on" line (the latest start)."""
        stamps = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                  for line in self.log_path.read_text(errors="replace").splitlines() if " serving on " in line]
        assert stamps, f"{self.name} never served"
        return stamps[-1]

    def cetctl(self, *args: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run the real `cetctl` against this daemon, with --json."""
        result = subprocess.run(
            [*self.prefix, sys.executable, "-m", "cetd.cli.cetctl", "--state-dir", str(self.state_dir), "--json",
             *args],
            capture_output=True, text=True, timeout=timeout, cwd=REPO,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"cetctl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def peers(self) -> dict[str, Any]:
        """What `cetctl peers --json` prints; fetched in-process (a subprocess per poll is slow) unless the
        daemon lives in another network namespace."""
        import asyncio

        if self.prefix:
            data: dict[str, Any] = json.loads(self.cetctl("peers").stdout)
            return data

        from cetd.cli.cetctl import view_as_dict
        from cetd.cli.connect import open_client

        async def fetch() -> dict[str, Any]:
            async with open_client(self.state_dir) as client:
                return view_as_dict(await client.list_peers())

        return asyncio.run(fetch())


@contextlib.contextmanager
def stalled(daemons: Sequence[DaemonProcess]) -> Iterator[None]:
    """Stall every job process of ``daemons`` (SIGSTOP) for the block, then let them go on (SIGCONT).

    The daemons themselves keep running and heartbeating: to the household the devices are alive, their
    jobs just make no progress, as on a device whose training processes are not being scheduled.
    """
    import psutil

    processes = [p for daemon in daemons for p in daemon.job_processes()]
    assert processes, "no job process to stall"
    try:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.suspend()
        yield
    finally:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()


@dataclass
class Household:
    """N provisioned daemons; daemon 0 holds the household CA."""

    root: Path
    daemons: list[DaemonProcess] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        root: Path,
        n: int,
        *,
        hosts: Sequence[str] | None = None,
        prefixes: Sequence[Sequence[str]] | None = None,
        ranks: Sequence[int] | None = None,
        extra: dict[str, dict[str, Any]] | None = None,
        per_daemon: Sequence[dict[str, dict[str, Any]]] | None = None,
    ) -> Household:
        household = cls(root)
        for i in range(n):
            name = f"dev{i}"
            state_dir = root / name
            state_dir.mkdir(parents=True)
            if i == 0:
                init_household(StateDir(state_dir), name, household_name=HOUSEHOLD_NAME)
            else:
                provision_member(root / "dev0", state_dir, name)
            host = hosts[i] if hosts else "127.0.0.1"
            section_extra = {k: dict(v) for k, v in (extra or {}).items()}
            for section, values in (per_daemon[i] if per_daemon else {}).items():
                section_extra.setdefault(section, {}).update(values)
            if ranks is not None:
                section_extra.setdefault("device", {})["rank"] = ranks[i]
            config = write_config(root / f"{name}.toml", state_dir=state_dir, name=name, host=host,
                                  extra=section_extra)
            household.daemons.append(DaemonProcess(
                name=name, state_dir=state_dir, config_path=config, log_path=root / f"{name}.log", host=host,
                prefix=prefixes[i] if prefixes else (),
            ))
        # Every member must hold the final roster (provisioning grew it one device at a time).
        final = load_signed_roster(StateDir(root / "dev0"))
        for daemon in household.daemons[1:]:
            store_roster(StateDir(daemon.state_dir), final)
        return household

    def start_all(self) -> None:
        for daemon in self.daemons:
            daemon.start()
        for daemon in self.daemons:
            daemon.wait_ready()

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.stop()

    def __enter__(self) -> Household:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def logs(self) -> str:
        return "\n".join(f"===== {d.name}\n{d.log()}" for d in self.daemons)

    def coordinators(self, daemons: Sequence[DaemonProcess] | None = None) -> dict[str, tuple[int, str | None]]:
        """(term, coordinator) as each running daemon reports it."""
        views = {}
        for daemon in daemons or self.daemons:
            if daemon.alive():
                view = daemon.peers()
                views[daemon.name] = (int(view["term"]), view["coordinator_id"])
        return views

    def agreement_time(self, coordinator: str, term: int, daemons: Sequence[DaemonProcess] | None = None) -> float:
        """When the last of ``daemons`` logged that it follows (or is) ``coordinator`` in ``term``."""
        times = []
        for daemon in daemons or self.daemons:
            matching = [t for t, _, logged_term, who in daemon.role_changes() if who == coordinator and
                        logged_term == term]
            # A daemon that adopted the claim while its role line was unchanged logs nothing new; the
            # agreement itself is asserted through `agreed_coordinator`, this only times it.
            times.extend(matching[:1])
        assert times, f"no daemon logged term {term} of {coordinator}"
        return max(times)

    def agreed_coordinator(self, daemons: Sequence[DaemonProcess] | None = None) -> tuple[int, str] | None:
        """The (term, coordinator) when every given running daemon names the same one, else None."""
        views = set(self.coordinators(daemons).values())
        if len(views) == 1:
            term, coordinator = views.pop()
            if coordinator is not None:
                return term, coordinator
        return None
