"""The memory a device offers is measured, not assumed: a daemon in a real memory cgroup (as under systemd's
``MemoryMax=``) offers that limit, and what it has free follows what else in the cgroup uses, live, through
the heartbeats to the other daemons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.rig import Household, wait_until
from tests.testbed.cgroups import CgroupLimits, cgroup_v1_unavailable_reason

pytestmark = [pytest.mark.integration, pytest.mark.skipif(cgroup_v1_unavailable_reason() is not None,
                                                          reason=cgroup_v1_unavailable_reason() or "")]

MIB = 2**20
LIMIT = 768 * MIB
HOLD = 300 * MIB

# Holds argv[1] bytes resident (every page touched) until its stdin closes.
HOLDER = """
import sys
block = bytearray(int(sys.argv[1]))
block[::4096] = b"x" * len(block[::4096])
print("holding", flush=True)
sys.stdin.read()
"""


def capabilities_seen(household: Household, device_id: str | None) -> dict[str, Any]:
    view = household.daemons[0].peers()
    return next(p["capabilities"] for p in view["peers"] if p["device_id"] == device_id and p["state"] == "alive")


@pytest.mark.timeout(120)
def test_a_daemon_offers_its_cgroups_limit_and_what_is_free_in_it_now(tmp_path: Path) -> None:
    with CgroupLimits(memory_bytes=LIMIT) as limits, \
            Household.create(tmp_path, 2, prefixes=[(), limits.wrap_argv([])]) as household:
        household.start_all()
        limited = household.daemons[1]
        wait_until(lambda: limited.device_id in [p["device_id"] for p in household.daemons[0].peers()["peers"]
                                                 if p["state"] == "alive"], 20, what="the limited daemon")
        # No [device] memory_limit_bytes is configured: the ceiling is the cgroup's, not the machine's 24 GiB.
        caps = capabilities_seen(household, limited.device_id)
        assert caps["memory_bytes"] == LIMIT
        idle_free = caps["free_memory_bytes"]
        assert 400 * MIB < idle_free < LIMIT - 5 * MIB, idle_free / MIB  # the daemon itself uses some

        # Another process in the cgroup (not one of the daemon's jobs) takes memory: the offer shrinks.
        holder = subprocess.Popen(limits.wrap_argv([sys.executable, "-c", HOLDER, str(HOLD)]),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "holding"
            held = wait_until(lambda: (free := capabilities_seen(household, limited.device_id)["free_memory_bytes"])
                              < idle_free - HOLD + 40 * MIB and free, 30, interval=0.5, what="the smaller offer")
            print(f"\n[memory] free in a {LIMIT // MIB} MiB cgroup: {idle_free / MIB:.0f} MiB idle, "
                  f"{held / MIB:.0f} MiB while another process holds {HOLD // MIB} MiB")
            assert held > idle_free - HOLD - 40 * MIB
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)
        wait_until(lambda: capabilities_seen(household, limited.device_id)["free_memory_bytes"]
                   > idle_free - 40 * MIB, 30, interval=0.5, what="the memory back")
