"""Joining a household for real: invite tokens, owner approval, revocation — daemons, CLI, mDNS, TLS."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cetd.cli.connect import open_client
from cetd.errors import NotAuthorizedError
from cetd.identity import StateDir, init_household
from tests.integration.rig import REPO, DaemonProcess, Household, wait_until, write_config

pytestmark = pytest.mark.integration


def cetd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cetd", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def join(state_dir: Path, token: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cetd("--state-dir", str(state_dir), "--json", "join", token, "--name", state_dir.name,
                "--interface", "127.0.0.1", "--timeout", "8", *extra)


def new_daemon(root: Path, name: str, extra: dict[str, dict[str, object]] | None = None) -> DaemonProcess:
    state_dir = root / name
    config = write_config(root / f"{name}.toml", state_dir=state_dir, name=name, host="127.0.0.1", extra=extra)
    return DaemonProcess(name=name, state_dir=state_dir, config_path=config, log_path=root / f"{name}.log")


@pytest.mark.timeout(180)
def test_token_join_works_once_and_refuses_reuse_expiry_and_foreign_tokens(tmp_path: Path) -> None:
    with Household.create(tmp_path, 1) as household:
        household.start_all()
        ca = household.daemons[0]
        token = json.loads(ca.cetctl("invite", "--ttl", "10m").stdout)["token"]

        joined = join(tmp_path / "newcomer", token)
        assert joined.returncode == 0, joined.stderr
        device_id = json.loads(joined.stdout)["device_id"]
        newcomer = new_daemon(tmp_path, "newcomer")
        household.daemons.append(newcomer)
        newcomer.start()
        newcomer.wait_ready()

        wait_until(lambda: ca.sees_alive(device_id), 10, what="newcomer alive at the CA holder")

        # The same token again, from another device: refused, nothing written.
        again = join(tmp_path / "second", token)
        assert again.returncode == 77, again.stderr
        assert "already used" in again.stderr
        assert not (tmp_path / "second" / "device.pem").exists()

        # An expired token.
        short = json.loads(ca.cetctl("invite", "--ttl", "1s").stdout)["token"]
        time.sleep(1.5)
        expired = join(tmp_path / "third", short)
        assert expired.returncode == 77
        assert "expired" in expired.stderr

        # A token of another household: its CA fingerprint matches no endpoint on the network.
        other = StateDir(tmp_path / "other-household")
        init_household(other, "elsewhere")
        foreign = other.token_store().issue(__import__("datetime").timedelta(minutes=5)).encode()
        refused = join(tmp_path / "fourth", foreign)
        assert refused.returncode == 77, refused.stderr
        assert "another" in refused.stderr
        assert "household" in refused.stderr

        # A malformed token is refused before any network traffic.
        garbage = join(tmp_path / "fifth", "cetd1.AAAA")
        assert garbage.returncode == 77
        assert "token" in garbage.stderr


@pytest.mark.timeout(180)
def test_owner_approval_then_revocation_refused_within_a_heartbeat(tmp_path: Path) -> None:
    with Household.create(tmp_path, 2) as household:
        household.start_all()
        ca, member = household.daemons
        fresh = new_daemon(tmp_path, "fresh")
        household.daemons.append(fresh)
        fresh.start()  # no identity, no token: it files a pending request and advertises itself

        def pending() -> list[dict[str, object]]:
            rows: list[dict[str, object]] = json.loads(ca.cetctl("devices", "pending").stdout)
            return rows

        rows = wait_until(pending, 15, interval=0.5, what="pending request")
        request = rows[0]
        assert request["name"] == "fresh"
        code = str(request["verification_code"])
        assert len(code) == 7
        # The same code is shown on the new device, so the owner approves the right one.
        wait_until(lambda: code in fresh.log(), 5, what="code in the new device's log")

        # Approval can be given from any member: it is forwarded to the CA holder.
        member.cetctl("devices", "approve", str(request["device_id"]))
        fresh.wait_ready(timeout=20)
        assert fresh.device_id == request["device_id"]

        def all_alive() -> bool:
            return all(
                sum(p["state"] == "alive" for p in d.peers()["peers"]) == 3 for d in household.daemons
            )

        wait_until(all_alive, 15, what="approved device alive everywhere")

        # Revoke it through the real CLI; from then on every call it makes is refused.
        ca.cetctl("devices", "revoke", str(fresh.device_id))
        revoked_at = time.monotonic()

        async def calls_as_revoked() -> list[str]:
            errors = []
            for target in (ca, member):
                async with open_client(fresh.state_dir, target.address) as client:
                    with pytest.raises(NotAuthorizedError) as refused:
                        await client.list_peers()
                    errors.append(str(refused.value))
            return errors

        errors = asyncio.run(calls_as_revoked())
        elapsed = time.monotonic() - revoked_at
        print(f"\n[timing] revoked device refused by both members {elapsed:.2f}s after revoke returned")
        assert all("revoked" in e for e in errors), errors
        assert elapsed < 0.5  # one heartbeat interval: the roster is pushed, not waited for
        # The real CLI on the revoked device gets the sentence and exit code 77.
        result = fresh.cetctl("--address", member.address, "peers", check=False)
        assert result.returncode == 77
        assert "revoked" in result.stderr
        view = member.peers()
        assert all(p["device_id"] != fresh.device_id or p["state"] == "revoked" for p in view["peers"])


@pytest.mark.timeout(120)
def test_zero_touch_token_in_config_joins_on_first_start(tmp_path: Path) -> None:
    with Household.create(tmp_path, 1) as household:
        household.start_all()
        token = json.loads(household.daemons[0].cetctl("invite", "--ttl", "10m").stdout)["token"]
        # The token is dropped into the config before the device's first boot; nobody runs `cetd join`.
        device = new_daemon(tmp_path, "zerotouch", extra={"join": {"token": token, "owner_approval": False}})
        household.daemons.append(device)
        device.start()
        device.wait_ready(timeout=30)
        assert "joining with the configured token" in device.log()
        wait_until(lambda: any(p["device_id"] == device.device_id and p["state"] == "alive"
                               for p in household.daemons[0].peers()["peers"]), 10, what="zero-touch member alive")
        # A restart uses the stored identity; the (now used) token is not needed again.
        device.stop()
        device.start()
        device.wait_ready(timeout=30)
