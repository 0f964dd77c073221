"""Power profiles: built-in figures, "auto" from hardware hints, config overrides, the stated energy model."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from cetd.cluster.power import BUILTIN_PROFILES, DeviceUsage, EnergyModel, hardware_hints, profile_for
from cetd.errors import ConfigError


@pytest.mark.timeout(10)
def test_builtin_profiles_match_their_public_figures() -> None:
    pi4 = BUILTIN_PROFILES["raspberry-pi-4"]
    assert pi4.idle_watts == 2.7
    assert pi4.full_load_watts == pytest.approx(6.4)
    nano = BUILTIN_PROFILES["jetson-nano"]
    assert nano.full_load_watts == pytest.approx(10.0)  # the 10 W (MAXN) mode
    assert BUILTIN_PROFILES["jetson-tx2"].full_load_watts == pytest.approx(15.0, abs=0.1)
    assert BUILTIN_PROFILES["jetson-xavier-nx"].full_load_watts == pytest.approx(20.0)
    assert set(BUILTIN_PROFILES) == {"jetson-nano", "jetson-tx2", "jetson-xavier-nx", "raspberry-pi-4",
                                     "raspberry-pi-5", "laptop", "desktop"}
    assert all(p.reference for p in BUILTIN_PROFILES.values())
    assert BUILTIN_PROFILES["desktop"].network == "ethernet"
    assert BUILTIN_PROFILES["laptop"].joules_per_byte_sent > BUILTIN_PROFILES["desktop"].joules_per_byte_sent


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("hints", "expected"), [
    ({"model": "NVIDIA Jetson Nano Developer Kit"}, "jetson-nano"),
    ({"model": "NVIDIA Jetson Xavier NX Developer Kit"}, "jetson-xavier-nx"),
    ({"model": "quill"}, "jetson-tx2"),
    ({"model": "Raspberry Pi 4 Model B Rev 1.4"}, "raspberry-pi-4"),
    ({"model": "Raspberry Pi 5 Model B Rev 1.0"}, "raspberry-pi-5"),
    ({"battery": True, "cores": 8}, "laptop"),
    ({"cores": 16}, "desktop"),
    ({}, "desktop"),
])
def test_auto_picks_the_profile_the_hardware_points_to(hints: dict[str, object], expected: str) -> None:
    assert profile_for("auto", hints=hints).name == expected


@pytest.mark.timeout(10)
def test_overrides_from_the_config_replace_fields() -> None:
    profile = profile_for("raspberry-pi-4", overrides={"idle_watts": 3.1, "cores": "4", "network": "ethernet"})
    assert profile.idle_watts == 3.1
    assert profile.joules_per_byte_sent == pytest.approx(4e-9)
    assert "Overridden" in profile.reference
    explicit = profile_for("laptop", overrides={"network": "ethernet", "joules_per_byte_sent": 1e-8})
    assert explicit.joules_per_byte_sent == 1e-8


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("name", "overrides", "match"), [
    ("toaster", None, "unknown power profile 'toaster'"),
    ("laptop", {"turbo": 1}, "unknown power profile field"),
    ("laptop", {"idle_watts": -1}, "must not be negative"),
    ("laptop", {"idle_watts": "lots"}, "must be a number"),
    ("laptop", {"network": "carrier pigeon"}, "wifi or ethernet"),
])
def test_bad_profiles_are_config_errors(name: str, overrides: dict[str, object] | None, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        profile_for(name, overrides=overrides)


@pytest.mark.timeout(10)
def test_hardware_hints_read_a_fake_tree(tmp_path: Path) -> None:
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\0")
    battery = tmp_path / "sys" / "class" / "power_supply" / "BAT0"
    battery.mkdir(parents=True)
    (battery / "type").write_text("Battery\n")
    hints = hardware_hints(tmp_path)
    assert hints["model"] == "Raspberry Pi 4 Model B Rev 1.4"
    assert hints["battery"] is True
    assert profile_for("auto", hints=hints).name == "raspberry-pi-4"  # the board wins over the battery
    assert hardware_hints(tmp_path / "empty")["battery"] is False


@pytest.mark.timeout(10)
def test_energy_model_adds_idle_compute_and_network_joules() -> None:
    model = EnergyModel(profiles={"pi": BUILTIN_PROFILES["raspberry-pi-4"], "nano": BUILTIN_PROFILES["jetson-nano"]})
    pi = model.device_joules(DeviceUsage(device_id="pi", wall=timedelta(seconds=10), cpu_time=timedelta(seconds=20),
                                         bytes_sent=1_000_000, bytes_received=2_000_000))
    # 2.7 W × 10 s + 0.925 W × 20 CPU-s + 1e6 × 20 nJ + 2e6 × 15 nJ
    assert pi.idle_joules == pytest.approx(27.0)
    assert pi.compute_joules == pytest.approx(18.5)
    assert pi.network_joules == pytest.approx(0.05)
    assert pi.joules == pytest.approx(45.55)
    assert (pi.source, pi.profile) == ("model", "raspberry-pi-4")
    nano = model.device_joules(DeviceUsage(device_id="nano", wall=timedelta(seconds=4), cpu_time=timedelta(seconds=4),
                                           accelerator_time=timedelta(seconds=2)))
    assert nano.joules == pytest.approx(1.25 * 4 + 1.0 * 4 + 4.75 * 2)
    other = model.device_joules(DeviceUsage(device_id="x", wall=timedelta(seconds=1), cpu_time=timedelta(0)))
    assert other.profile == "desktop"
    assert other.joules == pytest.approx(40.0)
    report = model.job_joules([DeviceUsage(device_id="pi", wall=timedelta(seconds=10), cpu_time=timedelta(seconds=20)),
                               DeviceUsage(device_id="x", wall=timedelta(seconds=1), cpu_time=timedelta(0))], samples=5)
    assert report.joules == pytest.approx(27.0 + 18.5 + 40.0)
    assert report.joules_per_sample == pytest.approx(85.5 / 5)
