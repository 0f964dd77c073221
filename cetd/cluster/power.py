"""Power profiles of household devices and the stated energy model built on them.

Most devices have no power sensor (see `cetd.cluster.energy_meters` for those that do), so cetd
estimates energy from what it can measure: wall time, CPU-seconds and bytes on the network,

    J = idle W × wall s + W per busy core × CPU-seconds + W of a busy accelerator × its busy seconds
        + bytes sent × J/byte sent + bytes received × J/byte received,

with a `PowerProfile` per device. Every figure it produces says it came from this model
(``source="model"``) and names the profile, so a report never passes an estimate off as a measurement.
The built-in figures are public, rounded measurements or vendor power modes; each profile's
``reference`` says where its numbers come from. They are estimates: a config may override any field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from cetd.errors import ConfigError

__all__ = [
    "BUILTIN_PROFILES",
    "DeviceUsage",
    "EnergyEstimate",
    "EnergyModel",
    "EnergyReport",
    "NetworkKind",
    "PowerProfile",
    "hardware_hints",
    "profile_for",
]

NetworkKind = Literal["wifi", "ethernet"]

# Radio and PHY energy per byte. Wi-Fi: an 802.11n/ac radio draws ~1.5–2.5 W transmitting and ~1–1.5 W
# receiving (Halperin et al., "Demystifying 802.11n power consumption", HotPower 2010) at roughly
# 50–100 MB/s of goodput: ≈ 20 nJ/byte sent, ≈ 15 nJ/byte received. Gigabit Ethernet: a 1000BASE-T PHY
# draws ~0.5 W active (IEEE 802.3az Energy-Efficient Ethernet studies) at 125 MB/s: ≈ 4 nJ/byte.
_WIFI_SEND_J_PER_BYTE = 20e-9
_WIFI_RECEIVE_J_PER_BYTE = 15e-9
_ETHERNET_J_PER_BYTE = 4e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class PowerProfile:
    """How much power one kind of device draws, split into what cetd can measure."""

    name: str
    idle_watts: float
    """Whole-device draw when powered on and idle (a taking-part device is on for the whole step)."""
    watts_per_core: float
    """Extra draw of one fully busy CPU core above idle (CPU-seconds × this = compute joules)."""
    cores: int
    """CPU cores of the reference device (used only to describe the profile's full load)."""
    accelerator_watts: float = 0.0
    """Extra draw of a fully busy accelerator (GPU) above idle; 0 when the device trains on its CPU."""
    network: NetworkKind = "wifi"
    joules_per_byte_sent: float = _WIFI_SEND_J_PER_BYTE
    joules_per_byte_received: float = _WIFI_RECEIVE_J_PER_BYTE
    reference: str = ""
    """Where the figures come from."""

    def __post_init__(self) -> None:
        numbers = {
            "idle_watts": self.idle_watts,
            "watts_per_core": self.watts_per_core,
            "accelerator_watts": self.accelerator_watts,
            "joules_per_byte_sent": self.joules_per_byte_sent,
            "joules_per_byte_received": self.joules_per_byte_received,
        }
        for field_name, value in numbers.items():
            if not value >= 0:
                raise ConfigError(f"power profile {self.name!r}: {field_name} must not be negative, not {value}")
        if self.cores < 1:
            raise ConfigError(f"power profile {self.name!r}: cores must be at least 1, not {self.cores}")
        if self.network not in ("wifi", "ethernet"):
            raise ConfigError(f"power profile {self.name!r}: network must be wifi or ethernet, not {self.network!r}")

    @property
    def full_load_watts(self) -> float:
        """Idle plus every core and the accelerator fully busy."""
        return self.idle_watts + self.watts_per_core * self.cores + self.accelerator_watts

    def on(self, network: NetworkKind) -> PowerProfile:
        """This profile with the per-byte costs of ``network``."""
        if network == "ethernet":
            return dataclasses.replace(self, network=network, joules_per_byte_sent=_ETHERNET_J_PER_BYTE,
                                       joules_per_byte_received=_ETHERNET_J_PER_BYTE)
        return dataclasses.replace(self, network=network, joules_per_byte_sent=_WIFI_SEND_J_PER_BYTE,
                                   joules_per_byte_received=_WIFI_RECEIVE_J_PER_BYTE)


BUILTIN_PROFILES: Mapping[str, PowerProfile] = {
    profile.name: profile
    for profile in (
        PowerProfile(
            name="jetson-nano", idle_watts=1.25, watts_per_core=1.0, cores=4, accelerator_watts=4.75,
            reference="NVIDIA Jetson Nano: 5 W and 10 W (MAXN) power modes; module idle ≈ 1.25 W; "
                      "four A57 cores ≈ 4 W flat out, the 128-core GPU the rest of the 10 W budget.",
        ),
        PowerProfile(
            name="jetson-tx2", idle_watts=1.9, watts_per_core=1.1, cores=6, accelerator_watts=6.5,
            reference="NVIDIA Jetson TX2: 7.5 W (Max-Q) and 15 W (Max-P) power modes; idle ≈ 1.9 W; "
                      "2 Denver + 4 A57 cores ≈ 6.6 W flat out, the Pascal GPU the rest of 15 W.",
        ),
        PowerProfile(
            name="jetson-xavier-nx", idle_watts=2.5, watts_per_core=1.2, cores=6, accelerator_watts=10.3,
            reference="NVIDIA Jetson Xavier NX: 10, 15 and 20 W power modes; module idle ≈ 2.5 W; "
                      "six Carmel cores ≈ 7 W flat out, the Volta GPU and DLAs the rest of 20 W.",
        ),
        PowerProfile(
            name="raspberry-pi-4", idle_watts=2.7, watts_per_core=0.925, cores=4,
            reference="Raspberry Pi 4 Model B: ≈ 2.7 W idle, ≈ 6.4 W with all four A72 cores loaded "
                      "(widely reproduced USB-meter measurements, e.g. Raspberry Pi Dramble / Tom's Hardware).",
        ),
        PowerProfile(
            name="raspberry-pi-5", idle_watts=2.7, watts_per_core=1.3, cores=4,
            reference="Raspberry Pi 5: ≈ 2.7 W idle, ≈ 7.9 W with all four A76 cores under stress-ng "
                      "(Jeff Geerling's and the Raspberry Pi forum's measurements, 2023).",
        ),
        PowerProfile(
            name="laptop", idle_watts=8.0, watts_per_core=3.5, cores=8,
            reference="A generic laptop: ≈ 6–10 W idle with the screen dimmed, a 15–28 W mobile CPU "
                      "package under all-core load (Intel U/P-series and AMD U-series TDPs).",
        ),
        PowerProfile(
            name="desktop", idle_watts=40.0, watts_per_core=10.0, cores=8, network="ethernet",
            joules_per_byte_sent=_ETHERNET_J_PER_BYTE, joules_per_byte_received=_ETHERNET_J_PER_BYTE,
            reference="A generic desktop: ≈ 30–50 W idle at the wall, a 65–125 W CPU package under "
                      "all-core load (mainstream desktop TDPs), wired Ethernet.",
        ),
    )
}

_DEVICE_TREE_PATTERNS: Sequence[tuple[str, str]] = (
    (r"jetson[- ]?nano|p3448|p3450", "jetson-nano"),
    (r"xavier[- ]?nx|p3668|p3509", "jetson-xavier-nx"),
    (r"jetson[- ]?tx2|quill|p3310|p3489", "jetson-tx2"),
    (r"raspberry pi 5", "raspberry-pi-5"),
    (r"raspberry pi 4|raspberry pi compute module 4|raspberry pi 400", "raspberry-pi-4"),
)


def profile_for(
    name: str = "auto",
    *,
    hints: Mapping[str, object] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> PowerProfile:
    """The power profile called ``name`` (or, for ``"auto"``, the one ``hints`` point to), with ``overrides``.

    Args:
        name: a key of `BUILTIN_PROFILES`, or ``"auto"``.
        hints: facts about the hardware for ``"auto"`` (see `hardware_hints`): ``model`` (the text of
            ``/proc/device-tree/model``), ``battery`` (a battery is present), ``cores``.
        overrides: profile fields from the config (``idle_watts``, ``watts_per_core``, ``network``…);
            ``network`` first switches the per-byte costs to that network's, explicit per-byte costs win.

    Raises:
        ConfigError: an unknown profile name or field, or an invalid value.
    """
    hints = hints or {}
    if name == "auto":
        name = _auto_name(hints)
    try:
        profile = BUILTIN_PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_PROFILES))
        raise ConfigError(f"unknown power profile {name!r}; known profiles: auto, {known}") from None
    if not overrides:
        return profile
    fields = {f.name for f in dataclasses.fields(PowerProfile)} - {"name", "reference"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown power profile field(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key == "network":
            if value not in ("wifi", "ethernet"):
                raise ConfigError(f"power profile network must be wifi or ethernet, not {value!r}")
            profile = profile.on("wifi" if value == "wifi" else "ethernet")
            continue
        try:
            changes[key] = int(str(value)) if key == "cores" else float(str(value))
        except ValueError:
            raise ConfigError(f"power profile field {key} must be a number, not {value!r}") from None
    return dataclasses.replace(profile, reference=f"{profile.reference} Overridden by the config: "
                                                  f"{', '.join(sorted(overrides))}.", **changes)


def _auto_name(hints: Mapping[str, object]) -> str:
    model = str(hints.get("model", "")).lower()
    for pattern, name in _DEVICE_TREE_PATTERNS:
        if re.search(pattern, model):
            return name
    if model.startswith("nvidia jetson"):
        return "jetson-nano"  # the smallest Jetson: a conservative guess for an unknown one
    if hints.get("battery"):
        return "laptop"
    return "desktop"


def hardware_hints(root: Path = Path("/")) -> dict[str, object]:
    """Facts about this machine for ``profile_for("auto")``, read under ``root`` (tests pass a fake tree)."""
    hints: dict[str, object] = {"cores": os.cpu_count() or 1}
    model = root / "proc" / "device-tree" / "model"
    with contextlib.suppress(OSError):
        hints["model"] = model.read_bytes().rstrip(b"\0").decode("utf-8", "replace").strip()
    supplies = root / "sys" / "class" / "power_supply"
    try:
        hints["battery"] = any((s / "type").read_text().strip() == "Battery" for s in supplies.iterdir()
                               if (s / "type").is_file())
    except OSError:
        hints["battery"] = False
    return hints


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceUsage:
    """What one device did during a job (or a step), as measured there."""

    device_id: str
    wall: timedelta
    """Time the device took part (it is powered on for all of it)."""
    cpu_time: timedelta
    """CPU time of the device's training process, all threads (``resource.getrusage``)."""
    accelerator_time: timedelta = timedelta(0)
    """Time its accelerator was busy."""
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class EnergyEstimate:
    """Joules of one device, split by where they go, and where the number comes from."""

    device_id: str
    joules: float
    idle_joules: float
    compute_joules: float
    network_joules: float
    source: str
    """``"model"`` for this module's estimates (``"meter:<kind>"`` for a real meter's)."""
    profile: str
    """The power profile the estimate used."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EnergyReport:
    """Energy of a whole job: per device, in total and per sample."""

    devices: tuple[EnergyEstimate, ...]
    samples: int

    @property
    def joules(self) -> float:
        return sum(device.joules for device in self.devices)

    @property
    def joules_per_sample(self) -> float:
        return self.joules / self.samples if self.samples else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class EnergyModel:
    """The stated energy model: a power profile per device, a default for the rest."""

    profiles: Mapping[str, PowerProfile]
    """Device ID → its profile."""
    default: PowerProfile = BUILTIN_PROFILES["desktop"]

    def profile(self, device_id: str) -> PowerProfile:
        return self.profiles.get(device_id, self.default)

    def device_joules(self, usage: DeviceUsage) -> EnergyEstimate:
        """``idle W × wall + W/core × CPU-seconds + accelerator W × busy s + bytes × J/byte``."""
        profile = self.profile(usage.device_id)
        idle = profile.idle_watts * usage.wall.total_seconds()
        compute = (profile.watts_per_core * usage.cpu_time.total_seconds()
                   + profile.accelerator_watts * usage.accelerator_time.total_seconds())
        network = (usage.bytes_sent * profile.joules_per_byte_sent
                   + usage.bytes_received * profile.joules_per_byte_received)
        return EnergyEstimate(device_id=usage.device_id, joules=idle + compute + network, idle_joules=idle,
                              compute_joules=compute, network_joules=network, source="model",
                              profile=profile.name)

    def job_joules(self, usages: Sequence[DeviceUsage], *, samples: int) -> EnergyReport:
        """Every device's estimate and the job's joules per sample."""
        return EnergyReport(devices=tuple(self.device_joules(u) for u in usages), samples=samples)
