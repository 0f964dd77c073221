"""The household on real separate hosts: four network namespaces on a bridge, mDNS between them.

A 2|2 partition really separates the hosts (each half on its own bridge); after healing there must be
exactly one coordinator, with the higher term, and the deposed one's commands are refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.rig import REPO, Household, wait_until

from .netns import NetnsRig, requires_root

pytestmark = [pytest.mark.netns, requires_root]


def _household(rig: NetnsRig, root: Path, ranks: list[int]) -> Household:
    hosts = [h.ip for h in rig.hosts]
    prefixes = [["ip", "netns", "exec", h.netns] for h in rig.hosts]
    return Household.create(root, len(hosts), hosts=hosts, prefixes=prefixes, ranks=ranks)


@pytest.mark.timeout(240)
def test_four_hosts_elect_then_survive_a_two_two_partition(tmp_path: Path) -> None:
    with NetnsRig(4) as rig, _household(rig, tmp_path, ranks=[4, 3, 2, 1]) as household:
        household.start_all()
        term, coordinator = wait_until(household.agreed_coordinator, 15, interval=0.3, what="one coordinator")
        ready = max(d.started_serving() for d in household.daemons)
        elected = household.agreement_time(coordinator, term) - ready
        print(f"\n[timing] 4 namespace hosts: one coordinator {elected:.2f}s after all were serving (from their logs)")
        assert coordinator == household.daemons[0].device_id
        assert elected < 5.0
        for daemon in household.daemons:
            peers = daemon.peers()["peers"]
            alive = {p["device_id"] for p in peers if p["state"] == "alive"}
            assert len(alive) == 4
            assert all(p["address"].startswith("10.77.") for p in peers)

        left, right = household.daemons[:2], household.daemons[2:]
        cut = time.time()
        rig.partition([[0, 1], [2, 3]])

        def right_elected() -> tuple[int, str] | None:
            agreed = household.agreed_coordinator(right)
            return agreed if agreed and agreed[1] == right[0].device_id else None

        right_term, right_id = wait_until(right_elected, 15, interval=0.3, what="the cut-off half elects")
        print(f"[timing] partition: the half without the coordinator elected after "
              f"{household.agreement_time(right_id, right_term, right) - cut:.2f}s")
        assert right_term > term
        assert household.agreed_coordinator(left) == (term, coordinator)  # the old side keeps its own

        healed = time.time()
        rig.heal()
        final = wait_until(lambda: household.agreed_coordinator() == (right_term, right_id), 15, interval=0.3,
                           what="one coordinator after heal")
        print(f"[timing] heal: one coordinator again after "
              f"{household.agreement_time(right_id, right_term) - healed:.2f}s")
        assert final
        time.sleep(2.0)
        assert household.agreed_coordinator() == (right_term, right_id), "the higher term must stay"

        # The deposed coordinator's commands carry its old term: every member refuses them.
        deposed = household.daemons[0]
        for member in household.daemons[1:]:
            result = subprocess.run(
                [*deposed.prefix, sys.executable, "-m", "tests.testbed.send_command", str(deposed.state_dir),
                 member.address, str(term)],
                capture_output=True, text=True, timeout=30, cwd=REPO, check=True,
            )
            outcome = json.loads(result.stdout)
            assert outcome["accepted"] is False, (member.name, outcome)
            assert "stale term" in outcome["error"]
        # And the new coordinator's command with the current term is obeyed.
        result = subprocess.run(
            [*right[0].prefix, sys.executable, "-m", "tests.testbed.send_command", str(right[0].state_dir),
             household.daemons[1].address, str(right_term)],
            capture_output=True, text=True, timeout=30, cwd=REPO, check=True,
        )
        assert json.loads(result.stdout) == {"accepted": True, "term": right_term}
