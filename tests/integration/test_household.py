"""A household of real daemon processes on 127.0.0.1: mDNS discovery, election, failover, rejoin.

Timings printed here are what the closing notes quote (run with -s to see them).
"""

from __future__ import annotations

import signal
import stat
import time
from pathlib import Path

import pytest

from tests.integration.rig import HOUSEHOLD_NAME, Household, wait_until

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_four_daemons_discover_each_other_and_elect_the_best_ranked(tmp_path: Path) -> None:
    ranks = [2, 5, 3, 1]
    with Household.create(tmp_path, 4, ranks=ranks) as household:
        household.start_all()
        ready_at = time.monotonic()

        def everyone_sees_everyone() -> bool:
            for daemon in household.daemons:
                alive = [p for p in daemon.peers()["peers"] if p["state"] == "alive"]
                if len(alive) != 4:
                    return False
            return True

        wait_until(everyone_sees_everyone, 10, what="full mesh")
        discovered = time.monotonic()
        term, coordinator = wait_until(household.agreed_coordinator, 10, what="one coordinator")
        serving = max(d.started_serving() for d in household.daemons)
        elected = household.agreement_time(coordinator, term) - serving
        print(f"\n[timing] 4 daemons: full mesh seen {discovered - ready_at:.2f}s after all were ready; one "
              f"coordinator {elected:.2f}s after the last started serving (from their logs)")
        assert coordinator == household.daemons[1].device_id, "highest rank must win"
        assert term >= 1
        assert elected < 5.0
        peers = household.daemons[0].peers()["peers"]
        assert {p["role"] for p in peers if p["state"] == "alive"} == {"coordinator", "follower"}
        assert all(p["capabilities"]["cores"] >= 1 for p in peers)
        # All four run on this machine's kernel, and each heard the others say so over the heartbeats.
        assert len({p["capabilities"]["machine"] for p in peers}) == 1
        assert peers[0]["capabilities"]["machine"]
        # Addresses were learned from mDNS only: no static peers were configured.
        assert all(p["address"].startswith("127.0.0.1:") for p in peers)


@pytest.mark.timeout(150)
def test_coordinator_killed_then_restarted_rejoins_as_follower(tmp_path: Path) -> None:
    with Household.create(tmp_path, 4, ranks=[4, 3, 2, 1]) as household:
        household.start_all()
        term, coordinator = wait_until(household.agreed_coordinator, 15, what="first coordinator")
        old = household.daemons[0]
        assert coordinator == old.device_id
        survivors = household.daemons[1:]

        killed = time.time()
        old.kill(signal.SIGKILL)

        def new_coordinator() -> tuple[int, str] | None:
            agreed = household.agreed_coordinator(survivors)
            return agreed if agreed and agreed[1] != old.device_id else None

        new_term, new_id = wait_until(new_coordinator, 10, interval=0.05, what="failover")
        failover = household.agreement_time(new_id, new_term, survivors) - killed
        print(f"\n[timing] failover after kill -9: {failover:.2f}s (term {term} -> {new_term})")
        assert new_id == household.daemons[1].device_id
        assert new_term > term
        assert failover < 5.0

        old.start()
        old.wait_ready()

        def old_follows() -> bool:
            view = old.peers()
            return view["coordinator_id"] == new_id and view["term"] == new_term

        wait_until(old_follows, 10, what="restarted coordinator follows")
        time.sleep(2.0)  # past its startup grace: it must still not take over
        assert household.agreed_coordinator() == (new_term, new_id)


@pytest.mark.timeout(60)
def test_key_files_are_private_and_txt_leaks_no_name(tmp_path: Path) -> None:
    from zeroconf import ServiceBrowser, ServiceListener, Zeroconf

    with Household.create(tmp_path, 2) as household:
        household.start_all()
        for daemon in household.daemons:
            for key in daemon.state_dir.glob("*.key"):
                assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
            assert stat.S_IMODE(daemon.state_dir.stat().st_mode) == 0o700
        household_name = HOUSEHOLD_NAME
        records: dict[str, dict[bytes, bytes | None]] = {}

        class Listener(ServiceListener):
            def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
                info = zc.get_service_info(type_, name, timeout=2000)
                if info is not None:
                    records[name] = dict(info.properties)

            def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
                self.add_service(zc, type_, name)

            def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
                pass

        zc = Zeroconf(interfaces=["127.0.0.1"])
        try:
            ServiceBrowser(zc, "_cetd._tcp.local.", Listener())
            wait_until(lambda: len(records) >= 2, 10, what="two TXT records")
        finally:
            zc.close()
        ca_key = (household.daemons[0].state_dir / "ca.key").read_bytes()
        for props in records.values():
            blob = b" ".join(k + b"=" + (v or b"") for k, v in props.items())
            assert household_name.encode() not in blob
            assert b"dev0" not in blob  # device names stay private too
            assert b"dev1" not in blob
            assert ca_key[:40] not in blob
            assert set(props) <= {b"v", b"hh", b"id", b"p", b"ep", b"st", b"c", b"m", b"a", b"r"}
