"""Real energy meters, where the hardware has them: RAPL powercap, Jetson INA3221 rails, NVML.

Each meter reads counters or power sensors from sysfs (under a root the caller passes, so tests build a
fake tree) and offers `Meter.read_joules`: joules used since the meter was created. Energy counters
(RAPL ``energy_uj``) wrap around at ``max_energy_range_uj``; the meter adds the range back. Power sensors
(INA3221 rails in milliwatts, or volts and amperes through hwmon) give an instantaneous reading, so the
meter integrates samples over time (trapezoids): the daemon samples it periodically, and `read_joules`
takes one more sample. NVML is used only when ``pynvml`` imports and the GPU keeps an energy counter.
Every reading is labelled ``source="meter:<kind>"``; where no meter is found, `cetd.cluster.power`'s
model is used instead and says so.
"""

from __future__ import annotations

import importlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "Ina3221Meter",
    "Meter",
    "MeterReading",
    "NvmlMeter",
    "PowerChannel",
    "RaplMeter",
    "detect_meters",
    "read_meters",
]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Seconds from a monotonic clock."""


class Meter(Protocol):
    """An energy meter: joules used since it was created, from real hardware counters or sensors."""

    @property
    def kind(self) -> str:
        """``rapl``, ``ina3221`` or ``nvml``."""
        ...

    @property
    def name(self) -> str:
        """What it measures (a RAPL zone, rail names, a GPU index), for reports."""
        ...

    def read_joules(self) -> float:
        """Joules used since the meter was created (never decreasing)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterReading:
    """One meter's joules, labelled with where they come from."""

    joules: float
    source: str
    """``meter:<kind>``."""
    name: str


def read_meters(meters: Sequence[Meter]) -> list[MeterReading]:
    """Read every meter once."""
    return [MeterReading(joules=m.read_joules(), source=f"meter:{m.kind}", name=m.name) for m in meters]


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


@dataclass(slots=True)
class RaplMeter:
    """An Intel/AMD RAPL powercap zone (``/sys/class/powercap/intel-rapl:N``): a microjoule counter."""

    zone: Path
    _range_uj: int = field(init=False)
    _last_uj: int = field(init=False)
    _total_uj: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._range_uj = _read_int(self.zone / "max_energy_range_uj")
        self._last_uj = _read_int(self.zone / "energy_uj")

    @property
    def kind(self) -> str:
        return "rapl"

    @property
    def name(self) -> str:
        try:
            return f"{self.zone.name} ({(self.zone / 'name').read_text().strip()})"
        except OSError:
            return self.zone.name

    def read_joules(self) -> float:
        """Joules since creation; one wraparound of the counter between two reads is added back.

        Read at least once per wrap period (a package counter wraps after minutes to hours of load).
        """
        now = _read_int(self.zone / "energy_uj")
        delta = now - self._last_uj
        if delta < 0:
            delta += self._range_uj + 1
        self._total_uj += delta
        self._last_uj = now
        return self._total_uj / 1e6


@dataclass(frozen=True, slots=True)
class PowerChannel:
    """One INA3221 rail: either a power file (mW), or a voltage (mV) and a current (mA) file."""

    label: str
    power_mw: Path | None = None
    voltage_mv: Path | None = None
    current_ma: Path | None = None

    def watts(self) -> float:
        if self.power_mw is not None:
            return _read_int(self.power_mw) / 1e3
        assert self.voltage_mv is not None and self.current_ma is not None
        return _read_int(self.voltage_mv) * _read_int(self.current_ma) / 1e6


@dataclass(slots=True)
class Ina3221Meter:
    """Jetson INA3221 power monitors: rails sampled and integrated over time.

    Jetsons wire one rail to the whole board's input (``POM_5V_IN`` on a Nano, ``VDD_IN`` on a TX2 or
    Xavier NX) and others to parts of it (CPU, GPU): when an input rail exists only it is counted,
    otherwise every rail is summed.
    """

    channels: tuple[PowerChannel, ...]
    clock: Clock = time.monotonic
    _last_time: float = field(init=False)
    _last_watts: float = field(init=False)
    _joules: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if not self.channels:
            raise ValueError("an INA3221 meter needs at least one rail")
        self._last_time = self.clock()
        self._last_watts = self._watts()

    @property
    def kind(self) -> str:
        return "ina3221"

    @property
    def name(self) -> str:
        return "+".join(c.label for c in self.channels)

    def _watts(self) -> float:
        return sum(c.watts() for c in self.channels)

    def sample(self) -> float:
        """Take one power sample, add the energy since the last (trapezoid rule); returns the watts read."""
        now, watts = self.clock(), self._watts()
        self._joules += (now - self._last_time) * (watts + self._last_watts) / 2
        self._last_time, self._last_watts = now, watts
        return watts

    def read_joules(self) -> float:
        self.sample()
        return self._joules


@dataclass(slots=True)
class NvmlMeter:
    """An NVIDIA GPU's energy counter through NVML (millijoules since driver load, Volta and newer)."""

    index: int
    _nvml: Any = field(repr=False)
    _handle: Any = field(init=False, repr=False)
    _start_mj: int = field(init=False)

    def __post_init__(self) -> None:
        self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self.index)
        self._start_mj = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    @property
    def kind(self) -> str:
        return "nvml"

    @property
    def name(self) -> str:
        return f"gpu{self.index}"

    def read_joules(self) -> float:
        return (int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)) - self._start_mj) / 1e3


def detect_meters(root: Path = Path("/"), *, clock: Clock = time.monotonic, nvml: bool = True) -> list[Meter]:
    """Every readable energy meter under ``root``; empty on machines without sensors.

    RAPL: the top-level zones (``intel-rapl:N``; their ``:N:M`` subzones are parts of them) or, when
    a ``psys`` zone exists, that one alone (it already includes the packages). Unreadable counters
    (``energy_uj`` is root-only since Linux 5.10) are skipped.
    """
    meters: list[Meter] = [*_rapl_meters(root), *_ina3221_meters(root, clock)]
    if nvml:
        meters.extend(_nvml_meters())
    return meters


def _rapl_meters(root: Path) -> list[Meter]:
    powercap = root / "sys" / "class" / "powercap"
    if not powercap.is_dir():
        return []
    zones = sorted(p for p in powercap.iterdir() if re.fullmatch(r"intel-rapl:\d+", p.name))
    meters: list[RaplMeter] = []
    for zone in zones:
        try:
            meters.append(RaplMeter(zone))
        except (OSError, ValueError) as error:
            logger.debug("RAPL zone %s unreadable: %s", zone, error)
    psys = [m for m in meters if "psys" in m.name]
    return list(psys[:1] or meters)


def _ina3221_meters(root: Path, clock: Clock) -> list[Meter]:
    channels = [*_iio_channels(root), *_hwmon_channels(root)]
    readable = []
    for channel in channels:
        try:
            channel.watts()
        except (OSError, ValueError):
            continue
        readable.append(channel)
    if not readable:
        return []
    inputs = [c for c in readable if re.search(r"(^|_)IN$", c.label.upper())]
    return [Ina3221Meter(tuple(inputs or readable), clock=clock)]


def _iio_channels(root: Path) -> list[PowerChannel]:
    """L4T 32.x: ``/sys/bus/i2c/drivers/ina3221x/<bus>/iio:deviceN/in_powerK_input`` (mW), ``rail_name_K``."""
    channels = []
    for device in sorted((root / "sys" / "bus" / "i2c" / "drivers").glob("ina3221*/*/iio:device*")):
        for power in sorted(device.glob("in_power*_input")):
            index = power.name.removeprefix("in_power").removesuffix("_input")
            label = _label(device / f"rail_name_{index}", f"{device.parent.name}/rail{index}")
            channels.append(PowerChannel(label=label, power_mw=power))
    return channels


def _hwmon_channels(root: Path) -> list[PowerChannel]:
    """L4T 34+: ``/sys/bus/i2c/drivers/ina3221/<bus>/hwmon/hwmonN/inK_input`` (mV), ``currK_input`` (mA)."""
    channels = []
    for hwmon in sorted((root / "sys" / "bus" / "i2c" / "drivers").glob("ina3221*/*/hwmon/hwmon*")):
        for voltage in sorted(hwmon.glob("in*_input")):
            index = voltage.name.removeprefix("in").removesuffix("_input")
            current = hwmon / f"curr{index}_input"
            if not index.isdigit() or not current.exists():
                continue
            label = _label(hwmon / f"in{index}_label", f"{hwmon.parent.parent.name}/in{index}")
            channels.append(PowerChannel(label=label, voltage_mv=voltage, current_ma=current))
    return channels


def _label(path: Path, fallback: str) -> str:
    try:
        return path.read_text().strip() or fallback
    except OSError:
        return fallback


def _nvml_meters() -> list[Meter]:
    try:
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as error:  # no pynvml, no driver or no GPU: all mean "no NVML meter"
        logger.debug("no NVML meter: %s", error)
        return []
    meters: list[Meter] = []
    for index in range(count):
        try:
            meters.append(NvmlMeter(index, nvml))
        except Exception as error:  # a GPU without an energy counter (pre-Volta) raises NVMLError
            logger.debug("GPU %d has no NVML energy counter: %s", index, error)
    return meters
