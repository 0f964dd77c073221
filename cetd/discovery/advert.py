"""What a daemon announces about itself on the LAN, and its encoding as mDNS TXT properties.

An `Advert` says only where a device can be reached and what it offers; trust never comes from it
(every connection is mutual TLS against the household CA). Therefore the TXT record carries nothing
secret and nothing personal: a household *ID* (a hash of the CA certificate, checked to be hex),
never the household's name, a token or a key. Keys are one or two letters because the whole record
travels in every mDNS answer:

====  ==============================================================
v     protocol version
hh    household ID (hex), empty for a pending device without household
id    device ID
p     mutual-TLS gRPC port
ep    enrollment port, 0 when the device cannot enroll others
st    ``member`` or ``pending``
c     CPU cores
m     memory in GiB, rounded to 0.1
a     accelerator, ``-`` when none
r     election rank (a float, written so that it reads back exactly)
====  ==============================================================

`Advert.from_txt` raises `ValueError` on anything malformed; the browser logs and drops such
records, so a stranger's garbage never stops discovery.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from cetd.ids import PROTOCOL_VERSION, DeviceId, HouseholdId

__all__ = ["SERVICE_TYPE", "Advert", "AdvertState", "CapabilitySummary"]

SERVICE_TYPE = "_cetd._tcp.local."

AdvertState = Literal["member", "pending"]
"""``member``: holds a household certificate. ``pending``: waiting to be approved or to enroll."""

_STATES: tuple[str, ...] = get_args(AdvertState)
_GIB = 1 << 30
_NO_ACCELERATOR = "-"
_DEVICE_ID = re.compile(r"[A-Za-z0-9-]{1,128}")
# A hash only: hex, so a household's name can never end up in the record by mistake.
_HOUSEHOLD_ID = re.compile(r"[0-9A-Fa-f]{8,128}")
_MAX_ACCELERATOR_CHARS = 100


@dataclass(frozen=True, slots=True, kw_only=True)
class CapabilitySummary:
    """The part of a device's capabilities worth announcing before any connection is made."""

    cores: int
    """Logical CPU cores."""
    memory_bytes: int
    """Physical memory; the TXT record carries it rounded to 0.1 GiB."""
    accelerator: str = ""
    """E.g. ``"cuda:NVIDIA Jetson Orin"`` or ``"mps"``; empty when the device has none."""
    rank: float = 0.0
    """Election rank: higher wins (see `cetd.cluster.election.Candidate`)."""

    def __post_init__(self) -> None:
        if self.cores < 0:
            raise ValueError(f"cores must not be negative, not {self.cores}")
        if self.memory_bytes < 0:
            raise ValueError(f"memory must not be negative, not {self.memory_bytes} bytes")
        if self.accelerator == _NO_ACCELERATOR or len(self.accelerator) > _MAX_ACCELERATOR_CHARS:
            raise ValueError(f"accelerator name {self.accelerator!r} is reserved or too long")
        if not math.isfinite(self.rank):
            raise ValueError(f"rank must be a finite number, not {self.rank}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Advert:
    """One daemon's announcement."""

    device_id: DeviceId
    household_id: HouseholdId
    """Hex household ID; ``""`` for a pending device that belongs to no household yet."""
    port: int
    """Mutual-TLS gRPC port; 0 when the device serves none yet (pending)."""
    enroll_port: int = 0
    """Server-authenticated enrollment port; 0 when the device cannot enroll others."""
    state: AdvertState
    capabilities: CapabilitySummary
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not _DEVICE_ID.fullmatch(self.device_id):
            raise ValueError(f"device ID {self.device_id!r} is not of letters, digits and dashes")
        if self.household_id and not _HOUSEHOLD_ID.fullmatch(self.household_id):
            raise ValueError(f"household ID {self.household_id!r} is not a hex digest")
        if self.state not in _STATES:
            raise ValueError(f"state must be one of {_STATES}, not {self.state!r}")
        if self.state == "member" and not self.household_id:
            raise ValueError("a member's advert must name its household ID")
        for name, port in (("port", self.port), ("enroll port", self.enroll_port)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} {port} is outside 0..65535")
        if self.protocol_version < 0:
            raise ValueError(f"protocol version must not be negative, not {self.protocol_version}")

    def to_txt(self) -> dict[str, str]:
        """The TXT properties announcing this advert (see the module docstring for the keys)."""
        caps = self.capabilities
        return {
            "v": str(self.protocol_version),
            "hh": self.household_id,
            "id": self.device_id,
            "p": str(self.port),
            "ep": str(self.enroll_port),
            "st": self.state,
            "c": str(caps.cores),
            "m": f"{caps.memory_bytes / _GIB:.1f}",
            "a": caps.accelerator or _NO_ACCELERATOR,
            "r": repr(caps.rank),
        }

    @classmethod
    def from_txt(cls, properties: Mapping[bytes, bytes | None] | Mapping[str, str | None]) -> Advert:
        """Parse TXT properties as zeroconf returns them (bytes) or as `to_txt` writes them (str).

        Memory comes back rounded to 0.1 GiB; everything else round-trips exactly. Unknown keys
        are ignored so that a newer daemon may add some.

        Raises:
            ValueError: a key is missing, a value malformed or out of range.
        """
        txt = _decode(properties)

        def required(key: str) -> str:
            value = txt.get(key)
            if value is None:
                raise ValueError(f"TXT record lacks {key!r}")
            return value

        def integer(key: str, default: str | None = None) -> int:
            text = txt.get(key, default) if default is not None else required(key)
            if text is None or not text.isascii() or not text.isdigit():
                raise ValueError(f"TXT {key}={text!r} is not a non-negative integer")
            return int(text)

        def number(key: str) -> float:
            text = required(key)
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"TXT {key}={text!r} is not a number") from None

        state = required("st")
        if state not in _STATES:
            raise ValueError(f"TXT st={state!r} is neither 'member' nor 'pending'")
        memory_gib = number("m")
        if not math.isfinite(memory_gib) or memory_gib < 0:
            raise ValueError(f"TXT m={memory_gib!r} is not a memory size")
        accelerator = txt.get("a") or _NO_ACCELERATOR
        return cls(
            device_id=DeviceId(required("id")),
            household_id=HouseholdId(txt.get("hh") or ""),
            port=integer("p"),
            enroll_port=integer("ep", default="0"),
            state="member" if state == "member" else "pending",
            capabilities=CapabilitySummary(
                cores=integer("c"),
                memory_bytes=round(memory_gib * _GIB),
                accelerator="" if accelerator == _NO_ACCELERATOR else accelerator,
                rank=number("r"),
            ),
            protocol_version=integer("v"),
        )


def _decode(properties: Mapping[bytes, bytes | None] | Mapping[str, str | None]) -> dict[str, str | None]:
    decoded: dict[str, str | None] = {}
    for key, value in properties.items():
        try:
            text_key = key.decode("utf-8") if isinstance(key, bytes) else key
            text_value = value.decode("utf-8") if isinstance(value, bytes) else value
        except UnicodeDecodeError:
            raise ValueError(f"TXT key or value {key!r} is not UTF-8") from None
        decoded[text_key] = text_value
    return decoded
