"""Energy meters read from a fake sysfs tree: RAPL wraparound, INA3221 sampling (iio and hwmon), NVML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cetd.cluster.energy_meters import Ina3221Meter, NvmlMeter, RaplMeter, detect_meters, read_meters


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _rapl_zone(root: Path, zone: str, name: str, energy_uj: int, max_uj: int) -> Path:
    directory = root / "sys" / "class" / "powercap" / zone
    _write(directory / "name", name)
    _write(directory / "energy_uj", str(energy_uj))
    _write(directory / "max_energy_range_uj", str(max_uj))
    return directory


@pytest.mark.timeout(10)
def test_rapl_counts_across_a_wraparound(tmp_path: Path) -> None:
    zone = _rapl_zone(tmp_path, "intel-rapl:0", "package-0", 900_000, 999_999)
    _rapl_zone(tmp_path, "intel-rapl:0:0", "core", 5, 999_999)  # a part of the package: not counted again
    meters = detect_meters(tmp_path, nvml=False)
    assert len(meters) == 1
    meter = meters[0]
    assert isinstance(meter, RaplMeter)
    assert meter.name == "intel-rapl:0 (package-0)"
    _write(zone / "energy_uj", "950000")
    assert meter.read_joules() == pytest.approx(0.05)
    _write(zone / "energy_uj", "150000")  # wrapped past 999_999: 50_000 + 150_000 µJ
    assert meter.read_joules() == pytest.approx(0.25)
    _write(zone / "energy_uj", "150000")
    assert meter.read_joules() == pytest.approx(0.25)
    [reading] = read_meters(meters)
    assert reading.source == "meter:rapl"
    assert reading.joules == pytest.approx(0.25)


@pytest.mark.timeout(10)
def test_rapl_prefers_psys_and_sums_packages_otherwise(tmp_path: Path) -> None:
    _rapl_zone(tmp_path, "intel-rapl:0", "package-0", 0, 10**9)
    _rapl_zone(tmp_path, "intel-rapl:1", "package-1", 0, 10**9)
    assert [m.name for m in detect_meters(tmp_path, nvml=False)] == ["intel-rapl:0 (package-0)",
                                                                    "intel-rapl:1 (package-1)"]
    _rapl_zone(tmp_path, "intel-rapl:2", "psys", 0, 10**9)
    assert [m.name for m in detect_meters(tmp_path, nvml=False)] == ["intel-rapl:2 (psys)"]


@pytest.mark.timeout(10)
def test_unreadable_or_missing_sensors_give_no_meters(tmp_path: Path) -> None:
    assert detect_meters(tmp_path, nvml=False) == []
    zone = tmp_path / "sys" / "class" / "powercap" / "intel-rapl:0"
    zone.mkdir(parents=True)  # energy_uj missing (as when it is root-only and unreadable)
    assert detect_meters(tmp_path, nvml=False) == []


@pytest.mark.timeout(10)
def test_ina3221_iio_rails_are_sampled_and_integrated(tmp_path: Path) -> None:
    device = tmp_path / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for index, (name, milliwatts) in enumerate([("POM_5V_IN", 5000), ("POM_5V_GPU", 2000), ("POM_5V_CPU", 1500)]):
        _write(device / f"rail_name_{index}", name)
        _write(device / f"in_power{index}_input", str(milliwatts))
    clock = FakeClock()
    [meter] = detect_meters(tmp_path, clock=clock, nvml=False)
    assert isinstance(meter, Ina3221Meter)
    assert (meter.kind, meter.name) == ("ina3221", "POM_5V_IN")  # the board input only: no double counting
    clock.now += 2.0
    _write(device / "in_power0_input", "7000")
    assert meter.read_joules() == pytest.approx((5 + 7) / 2 * 2)  # 12 J, trapezoid
    clock.now += 1.0
    assert meter.sample() == pytest.approx(7.0)
    clock.now += 1.0
    assert meter.read_joules() == pytest.approx(12 + 7 * 2)


@pytest.mark.timeout(10)
def test_ina3221_hwmon_multiplies_volts_and_amps_and_sums_unlabelled_rails(tmp_path: Path) -> None:
    hwmon = tmp_path / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    _write(hwmon / "in1_input", "5000")  # mV
    _write(hwmon / "curr1_input", "1000")  # mA → 5 W
    _write(hwmon / "in2_input", "1000")
    _write(hwmon / "curr2_input", "500")  # 0.5 W
    _write(hwmon / "in7_input", "4800")  # a shunt-sum voltage with no current: not a rail
    clock = FakeClock()
    [meter] = detect_meters(tmp_path, clock=clock, nvml=False)
    clock.now += 3.0
    assert meter.read_joules() == pytest.approx(5.5 * 3)
    _write(hwmon / "in1_label", "VDD_IN")
    [labelled] = detect_meters(tmp_path, clock=clock, nvml=False)
    clock.now += 2.0
    assert labelled.name == "VDD_IN"
    assert labelled.read_joules() == pytest.approx(5.0 * 2)


class FakeNvml:
    """The few pynvml calls the meter makes (pynvml's camelCase names); the counter is in millijoules."""

    def __init__(self) -> None:
        self.millijoules = 1_000_000

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return ("gpu", index)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        return self.millijoules


@pytest.mark.timeout(10)
def test_nvml_meter_counts_from_its_creation() -> None:
    nvml = FakeNvml()
    meter = NvmlMeter(0, nvml)
    nvml.millijoules += 2500
    assert (meter.kind, meter.name) == ("nvml", "gpu0")
    assert meter.read_joules() == pytest.approx(2.5)
