"""What a device says about itself: the machine digest that tells the coordinator which devices share a CPU, and
the memory it offers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from cetd.daemon.capabilities import BOOT_ID, CgroupMemory, cgroup_memory, detect_capabilities, machine_digest
from cetd.daemon.planning_inputs import offered_memory
from cetd.transport.peer_info import Capabilities
from tests.testbed.cgroups import CgroupLimits, cgroup_v1_unavailable_reason

needs_cgroup_v1 = pytest.mark.skipif(cgroup_v1_unavailable_reason() is not None,
                                     reason=cgroup_v1_unavailable_reason() or "")


def test_the_machine_digest_is_stable_opaque_and_per_boot(tmp_path: Path) -> None:
    boot = tmp_path / "boot_id"
    boot.write_text("5b0f3c2e-9f43-4d7c-8a51-0d6c1f0e7a11\n")
    first = machine_digest(boot)
    assert first == machine_digest(boot)
    assert len(first) == 16
    assert int(first, 16) >= 0
    assert "5b0f3c2e" not in first
    boot.write_text("0d6c1f0e-7a11-4d7c-8a51-5b0f3c2e9f43\n")
    assert machine_digest(boot) != first


def test_no_boot_id_means_no_machine(tmp_path: Path) -> None:
    assert machine_digest(tmp_path / "missing") == ""
    (tmp_path / "empty").write_text("")
    assert machine_digest(tmp_path / "empty") == ""


def test_this_device_reports_its_kernel() -> None:
    expected = machine_digest() if BOOT_ID.exists() else ""
    assert detect_capabilities().machine == expected


# What memory a device offers: its cgroup's limit (systemd MemoryMax=, a container) and what is free now.
# The parsing tests lay out cgroup files in a temporary directory; the last two use a real cgroup.


def _v1(root: Path, path: str, *, limit: int, usage: int, active_file: int = 0, inactive_file: int = 0) -> None:
    directory = root / "memory" / path
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (directory / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (directory / "memory.stat").write_text(
        f"cache 1\nrss 2\ntotal_active_file {active_file}\ntotal_inactive_file {inactive_file}\n")


def _v2(root: Path, path: str, *, limit: str, current: int, file: int = 0) -> None:
    directory = root / path
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "memory.max").write_text(f"{limit}\n")
    (directory / "memory.current").write_text(f"{current}\n")
    (directory / "memory.stat").write_text(f"anon {current - file}\nfile {file}\nkernel 0\n")


MIB = 2**20
V1_NO_LIMIT = 9223372036854771712


def test_cgroup_v1_limit_is_the_tightest_on_the_way_up_and_page_cache_is_not_use(tmp_path: Path) -> None:
    _v1(tmp_path, "", limit=V1_NO_LIMIT, usage=9000 * MIB)
    _v1(tmp_path, "system.slice", limit=4096 * MIB, usage=3000 * MIB, inactive_file=500 * MIB)
    _v1(tmp_path, "system.slice/cetd.service", limit=2048 * MIB, usage=1000 * MIB,
        active_file=100 * MIB, inactive_file=300 * MIB)
    text = "9:name=systemd:/system.slice/cetd.service\n4:memory:/system.slice/cetd.service\n0::/\n"
    found = cgroup_memory(text, tmp_path)
    # The service leaves 2048 - (1000 - 400) MiB; the slice 4096 - (3000 - 500), more.
    assert found == CgroupMemory(limit_bytes=2048 * MIB, headroom_bytes=1448 * MIB)
    _v1(tmp_path, "system.slice", limit=4096 * MIB, usage=3900 * MIB)  # the rest of the slice uses more now
    assert cgroup_memory(text, tmp_path) == CgroupMemory(limit_bytes=2048 * MIB, headroom_bytes=196 * MIB)


def test_cgroup_v2_max_means_no_limit(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    _v2(tmp_path, "user.slice", limit="max", current=700 * MIB)
    _v2(tmp_path, "user.slice/cetd.service", limit="max", current=300 * MIB)
    assert cgroup_memory("0::/user.slice/cetd.service\n", tmp_path) is None
    _v2(tmp_path, "user.slice/cetd.service", limit=str(1024 * MIB), current=300 * MIB, file=100 * MIB)
    assert cgroup_memory("0::/user.slice/cetd.service\n", tmp_path) == CgroupMemory(
        limit_bytes=1024 * MIB, headroom_bytes=824 * MIB)


def test_no_memory_cgroup_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_memory("", tmp_path) is None
    assert cgroup_memory("3:cpu:/x\n", tmp_path) is None
    assert cgroup_memory("4:memory:/missing\n", tmp_path) is None  # files unreadable: nothing known to limit


def test_this_device_offers_no_more_than_it_has_and_says_what_is_free() -> None:
    caps = detect_capabilities()
    assert 0 < caps.free_memory_bytes <= caps.memory_bytes <= psutil.virtual_memory().total
    assert detect_capabilities(memory_limit_bytes=64 * MIB).memory_bytes == 64 * MIB
    assert detect_capabilities(memory_limit_bytes=64 * MIB).free_memory_bytes <= 64 * MIB


def test_offered_memory_is_the_free_memory_where_measured() -> None:
    assert offered_memory(Capabilities(cores=2, memory_bytes=4096 * MIB)) == 4096 * MIB  # not measured (yet)
    assert offered_memory(Capabilities(cores=2, memory_bytes=4096 * MIB, free_memory_bytes=1000 * MIB)) == 1000 * MIB
    assert offered_memory(Capabilities(cores=2, memory_bytes=512 * MIB, free_memory_bytes=1000 * MIB)) == 512 * MIB


_REPORT = """
import json
from cetd.daemon.capabilities import cgroup_memory, detect_capabilities, free_memory
caps = detect_capabilities()
block = bytearray(160 << 20)
block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not just reserved
print(json.dumps({"memory": caps.memory_bytes, "free": caps.free_memory_bytes,
                  "free_holding": free_memory(caps.memory_bytes)}))
"""


@needs_cgroup_v1
def test_in_a_real_memory_cgroup_the_offer_follows_its_limit_and_use() -> None:
    with CgroupLimits(memory_bytes=512 * MIB) as limits:
        done = subprocess.run(limits.wrap_argv([sys.executable, "-c", _REPORT]), capture_output=True, text=True,
                              timeout=60, check=True, cwd=Path(__file__).resolve().parents[2])
    report = json.loads(done.stdout)
    assert report["memory"] == 512 * MIB
    assert 300 * MIB < report["free"] < 512 * MIB  # the interpreter itself uses some of it
    assert report["free"] - report["free_holding"] >= 150 * MIB  # the 160 MiB it then held
