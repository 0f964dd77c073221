"""Tests for the shipped systemd files: the unit verifies, is hardened as documented, and its user exists.

`systemd-analyze verify` refuses a unit whose ExecStart binary is missing, and /usr/bin/cetd is not
installed on a development machine, so the unit is verified from a temporary copy whose ExecStart
points at this Python interpreter; everything else is verified as shipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "cetd.service"
SHIPPED_EXEC_START = "/usr/bin/cetd run --config /etc/cetd/cetd.toml"

# Back-off keys that systemd < 254 does not know; it warns and ignores them, which is intended.
NEW_SYSTEMD_KEYS = ("RestartSteps", "RestartMaxDelaySec")

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def directives(path: Path) -> dict[str, list[str]]:
    """Key → values of a unit file, in order (systemd allows repeated keys)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def runnable_copy(tmp_path: Path) -> Path:
    text = UNIT.read_text(encoding="utf-8")
    assert f"ExecStart={SHIPPED_EXEC_START}\n" in text
    copy = tmp_path / "cetd.service"
    copy.write_text(text.replace("ExecStart=/usr/bin/cetd ", f"ExecStart={Path(sys.executable).resolve()} "))
    return copy


@pytest.mark.timeout(60)
@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and not any(f"Unknown key '{key}'" in line for key in NEW_SYSTEMD_KEYS)
    ]
    assert result.returncode == 0, result.stderr
    assert complaints == []


@pytest.mark.timeout(60)
@needs_systemd_analyze
def test_unit_exposure_score_is_low(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    match = re.search(r"Overall exposure level for cetd\.service: (\d+\.\d+)", result.stdout + result.stderr)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot score unit files offline: {result.stderr.strip()[:200]}")
    # 0 is fully locked down, 10 is unprotected; the accelerator and home-directory allowances cost a little.
    assert float(match.group(1)) <= 4.5


@pytest.mark.timeout(10)
def test_unit_directives_match_the_design() -> None:
    unit = directives(UNIT)
    expected = {
        "Type": "notify",
        "ExecStart": SHIPPED_EXEC_START,
        "User": "cetd",
        "StateDirectory": "cetd",
        "StateDirectoryMode": "0700",
        "ConfigurationDirectory": "cetd",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "120",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "SystemCallArchitectures": "native",
        "WantedBy": "multi-user.target",
        "After": "network-online.target",
        "Wants": "network-online.target",
    }
    assert {key: unit.get(key, ["<missing>"])[-1] for key in expected} == expected
    assert set(unit["RestrictAddressFamilies"][-1].split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
        "AF_NETLINK",
    }
    # torch's JIT needs writable+executable memory; PrivateDevices would hide the accelerators.
    assert "MemoryDenyWriteExecute" not in unit
    assert "PrivateDevices" not in unit
    assert "DynamicUser" not in unit


@pytest.mark.timeout(30)
@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_creates_the_cetd_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    sysusers_dir = tmp_path / "usr" / "lib" / "sysusers.d"
    sysusers_dir.mkdir(parents=True)
    shutil.copy(SYSTEMD_DIR / "cetd.sysusers.conf", sysusers_dir / "cetd.conf")
    result = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}"], capture_output=True, text=True, timeout=20, check=False
    )
    assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    assert passwd["cetd"][5] == "/var/lib/cetd"
    assert int(passwd["cetd"][2]) < 1000  # a system user
    assert passwd["cetd"][6].endswith("nologin")
