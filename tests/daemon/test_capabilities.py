"""What a device says about itself: the machine digest that tells the coordinator which devices share a CPU."""

from __future__ import annotations

from pathlib import Path

from cetd.daemon.capabilities import BOOT_ID, detect_capabilities, machine_digest


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
