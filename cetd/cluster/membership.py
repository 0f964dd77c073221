"""Heartbeat-based failure detection: which peers are alive, suspect or dead right now.

mDNS never announces that a peer died (zeroconf sends no REMOVE for a killed or cut-off host), so
liveness comes only from heartbeats. This module is pure: the daemon calls `MembershipTable.observe`
for every heartbeat it sends or receives successfully and passes the current monotonic time in
seconds to every query; nothing here reads a clock, sleeps or touches the network, so the
tests drive time by hand.

A peer is ALIVE while its last heartbeat is younger than ``suspect_after``, SUSPECT until
``dead_after``, DEAD afterwards. A DEAD peer that heartbeats again is ALIVE at once: a device that
rebooted or whose Wi-Fi came back rejoins without anybody doing anything.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Generic, TypeVar

from cetd.errors import ConfigError
from cetd.ids import DeviceId

__all__ = ["FailureDetectorConfig", "MembershipTable", "PeerRecord", "PeerState"]

InfoT = TypeVar("InfoT")


class PeerState(enum.Enum):
    """What the failure detector currently believes about a peer."""

    ALIVE = "alive"
    """Heartbeat seen within ``suspect_after``: counted for elections and plans."""
    SUSPECT = "suspect"
    """Heartbeats overdue but not yet ``dead_after``: kept out of new plans, not yet replaced."""
    DEAD = "dead"
    """No heartbeat for ``dead_after``: its work is reassigned; it rejoins by heartbeating again."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureDetectorConfig:
    """Timing of heartbeats and of the verdicts drawn from their absence."""

    heartbeat_interval: timedelta = timedelta(seconds=0.5)
    """How often each daemon heartbeats every known peer."""
    suspect_after: timedelta = timedelta(seconds=1.5)
    """Silence after which a peer is SUSPECT; several heartbeat intervals so one lost packet is harmless."""
    dead_after: timedelta = timedelta(seconds=3.0)
    """Silence after which a peer is DEAD and, if it was the coordinator, a new one is elected."""

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= timedelta(0):
            raise ConfigError(f"heartbeat interval must be positive, not {self.heartbeat_interval}")
        if self.suspect_after <= self.heartbeat_interval:
            raise ConfigError(
                f"suspect_after ({self.suspect_after}) must exceed the heartbeat interval "
                f"({self.heartbeat_interval}), or every peer would flap to suspect between heartbeats"
            )
        if self.dead_after <= self.suspect_after:
            raise ConfigError(f"dead_after ({self.dead_after}) must exceed suspect_after ({self.suspect_after})")


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRecord(Generic[InfoT]):
    """One row of `MembershipTable.snapshot`."""

    device_id: DeviceId
    info: InfoT
    """What the daemon stored with the latest heartbeat (address, capabilities, ...)."""
    state: PeerState
    last_seen_age: timedelta
    """Time since the latest heartbeat, at the ``now`` the snapshot was taken."""


@dataclass(slots=True)
class _Entry(Generic[InfoT]):
    info: InfoT
    last_seen: float


class MembershipTable(Generic[InfoT]):
    """The peers this daemon has heard from, with the time of their latest heartbeat.

    ``InfoT`` is whatever the daemon wants to keep per peer; the table only stores the latest one.
    Time is a float in seconds from any monotonic clock, the same one for every call.
    """

    def __init__(self, config: FailureDetectorConfig | None = None) -> None:
        self._config = config if config is not None else FailureDetectorConfig()
        self._suspect_after_s = self._config.suspect_after.total_seconds()
        self._dead_after_s = self._config.dead_after.total_seconds()
        self._entries: dict[DeviceId, _Entry[InfoT]] = {}

    @property
    def config(self) -> FailureDetectorConfig:
        return self._config

    def observe(self, device_id: DeviceId, info: InfoT, now: float) -> PeerState | None:
        """Record a heartbeat from ``device_id`` at ``now`` carrying ``info``.

        Returns:
            The peer's state just before this heartbeat, or None when it was never seen: the daemon
            logs a join when this is None or `PeerState.DEAD`.
        """
        entry = self._entries.get(device_id)
        if entry is None:
            self._entries[device_id] = _Entry(info=info, last_seen=now)
            return None
        previous = self._classify(now - entry.last_seen)
        entry.info = info
        # Heartbeats handled out of order must not move the last sighting back in time.
        entry.last_seen = max(entry.last_seen, now)
        return previous

    def state(self, device_id: DeviceId, now: float) -> PeerState | None:
        """The peer's state at ``now``; None for a device never observed (or forgotten)."""
        entry = self._entries.get(device_id)
        return None if entry is None else self._classify(now - entry.last_seen)

    def info(self, device_id: DeviceId) -> InfoT:
        """The info stored with the peer's latest heartbeat.

        Raises:
            KeyError: the device was never observed or was forgotten.
        """
        return self._entries[device_id].info

    def alive(self, now: float) -> set[DeviceId]:
        """Peers that are ALIVE at ``now`` (SUSPECT ones are not)."""
        return {
            device_id
            for device_id, entry in self._entries.items()
            if self._classify(now - entry.last_seen) is PeerState.ALIVE
        }

    def alive_info(self, now: float) -> dict[DeviceId, InfoT]:
        """Info of the peers that are ALIVE at ``now``, e.g. to feed their ranks to the election."""
        return {device_id: self._entries[device_id].info for device_id in self.alive(now)}

    def present(self, now: float) -> dict[DeviceId, InfoT]:
        """Info of the peers not DEAD at ``now`` (ALIVE or SUSPECT).

        This is what the election is fed: a coordinator whose heartbeats are merely late keeps its
        role until it is declared dead, so one lost packet never triggers an election.
        """
        return {
            device_id: entry.info
            for device_id, entry in self._entries.items()
            if self._classify(now - entry.last_seen) is not PeerState.DEAD
        }

    def snapshot(self, now: float) -> list[PeerRecord[InfoT]]:
        """Every known peer with its state and the age of its latest heartbeat, sorted by device ID."""
        return [
            PeerRecord(
                device_id=device_id,
                info=entry.info,
                state=self._classify(now - entry.last_seen),
                last_seen_age=timedelta(seconds=max(0.0, now - entry.last_seen)),
            )
            for device_id, entry in sorted(self._entries.items())
        ]

    def forget(self, device_id: DeviceId) -> None:
        """Drop a peer (e.g. revoked); a later heartbeat from it would add it again. No-op if unknown."""
        self._entries.pop(device_id, None)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._entries

    def __iter__(self) -> Iterator[DeviceId]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def _classify(self, age: float) -> PeerState:
        if age < self._suspect_after_s:
            return PeerState.ALIVE
        if age < self._dead_after_s:
            return PeerState.SUSPECT
        return PeerState.DEAD
