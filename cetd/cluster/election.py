"""Coordinator election: a deterministic, term-numbered state machine fed by heartbeats.

Every daemon runs one `Election`. Heartbeats carry the sender's adopted `Claim` (term, coordinator,
coordinator's rank); the daemon hands each one to `Election.on_claim` and calls `Election.tick`
every heartbeat interval with the peers its failure detector has not declared DEAD. The machine is pure:
no clock, no I/O, so it is tested exhaustively with an in-memory simulator.

Rules, and why:

* Claims are totally ordered by (term, rank, device ID) and every node adopts the highest claim it
  has seen. Two claims of one term (made on both sides of a partition) therefore resolve the same
  way everywhere: the lower one's coordinator steps down as soon as it hears the higher one.
* A node claims only when no coordinator it knows of is alive, only after its startup grace (so
  that discovery has settled and the winner is the best-ranked device, not the fastest to boot) and
  only when it is the best `Candidate` among the live peers and itself. Its claim's term is the
  highest term it has seen plus one, so terms never go backwards and a command stamped with an old
  term is recognisably stale (`Election.validate_command`).
* No preemption: a live coordinator keeps its role even when a better-ranked device appears; a
  restarted former coordinator adopts the current claim and follows. Re-electing on every join
  would restart the job's plan each time a laptop wakes up.
* A restarted daemon never resumes a claim that names it but was made by its previous incarnation
  (it cannot know what that incarnation commanded): if the others still follow such a claim, it
  claims again at once with a higher term.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from cetd.errors import ConfigError, StaleTermError
from cetd.ids import DeviceId, Term

__all__ = ["Candidate", "Claim", "Election", "ElectionConfig", "Role"]


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class Candidate:
    """A device standing for election, ordered so that the maximum is the winner.

    Order: higher rank wins; equal ranks are broken by the lexicographically larger device ID
    (plain ``str`` comparison), which every node computes identically.
    """

    rank: float
    device_id: DeviceId

    def __post_init__(self) -> None:
        if not math.isfinite(self.rank):
            raise ValueError(f"rank of {self.device_id} must be finite, not {self.rank}")


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class Claim:
    """The statement that ``coordinator_id`` coordinates from ``term`` on, ordered by (term, rank, device ID).

    Field order matters: the generated ordering compares ``term`` first, then the coordinator's
    `Candidate` order (rank, then device ID).
    """

    term: Term
    """At least 1; a heartbeat with term 0 carries no claim."""
    coordinator_rank: float
    coordinator_id: DeviceId

    def __post_init__(self) -> None:
        if self.term < 1:
            raise ValueError(f"a claim's term is at least 1, not {self.term}")
        if not math.isfinite(self.coordinator_rank):
            raise ValueError(f"rank of {self.coordinator_id} must be finite, not {self.coordinator_rank}")
        if not self.coordinator_id:
            raise ValueError("a claim must name its coordinator")

    @property
    def candidate(self) -> Candidate:
        return Candidate(rank=self.coordinator_rank, device_id=self.coordinator_id)

    def __str__(self) -> str:
        return f"term {self.term} of {self.coordinator_id}"


class Role(enum.Enum):
    """This node's part in the current term; the values are what `cetctl peers` shows."""

    COORDINATOR = "coordinator"
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    """No live coordinator is known: waiting for the grace period or for the best device to claim."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ElectionConfig:
    """Timing of the election."""

    startup_grace: timedelta = timedelta(seconds=1.5)
    """After its start a node adopts claims but makes none for this long, so that it has heard
    every peer's heartbeat and the election picks the best-ranked device deterministically."""

    new_claim_grace: timedelta = timedelta(seconds=1.5)
    """A newly adopted claim's coordinator counts as alive for this long even before its own
    heartbeat arrives: claims spread through every peer's heartbeats, faster than one coordinator's
    heartbeats reach everybody, and a claim must not look dead merely because it travelled fast."""

    def __post_init__(self) -> None:
        if self.startup_grace < timedelta(0):
            raise ConfigError(f"election startup grace must not be negative, not {self.startup_grace}")
        if self.new_claim_grace < timedelta(0):
            raise ConfigError(f"election new-claim grace must not be negative, not {self.new_claim_grace}")


@dataclass(slots=True)
class _CommandFloor:
    """The newest (term, coordinator) seen only through a command, before its claim arrived."""

    term: Term
    coordinator_id: DeviceId


@dataclass(slots=True, eq=False)
class Election:
    """One node's election state machine.

    Time is a float in seconds from a monotonic clock; the startup grace counts from ``started_at``
    or, when that is None, from the first `tick`.
    """

    self_id: DeviceId
    self_rank: float
    config: ElectionConfig = field(default_factory=ElectionConfig)
    started_at: float | None = None
    _adopted: Claim | None = field(default=None, init=False)
    _own_claim: Claim | None = field(default=None, init=False)
    _adopted_at: float | None = field(default=None, init=False)
    _now: float = field(default=0.0, init=False)
    _alive: frozenset[DeviceId] = field(default=frozenset(), init=False)
    _command_floor: _CommandFloor | None = field(default=None, init=False)

    # ---- inputs ----

    def on_claim(self, claim: Claim) -> bool:
        """Take note of a claim carried by a heartbeat (or made by this node).

        Returns:
            True when the claim is higher than the one adopted so far and is now adopted; a
            coordinator that adopts someone else's claim has stepped down.
        """
        if self._adopted is not None and claim <= self._adopted:
            return False
        self._adopted = claim
        self._adopted_at = None  # stamped by the next tick, which knows the time
        return True

    def tick(self, now: float, alive: Mapping[DeviceId, float]) -> Claim | None:
        """Advance the machine.

        Args:
            now: current time in seconds.
            alive: rank of every peer the failure detector has not declared DEAD, i.e. ALIVE or
                SUSPECT (`MembershipTable.present`), so that a coordinator whose heartbeats are
                merely late is not replaced; self is ignored if present.

        Returns:
            The claim of the live coordinator this node follows or is, or None while there is none.
            When the result is a claim this node just made, the daemon announces it in its heartbeats.
        """
        if self.started_at is None:
            self.started_at = now
        if self._adopted_at is None:
            self._adopted_at = now
        self._now = now
        self._alive = frozenset(device_id for device_id in alive if device_id != self.self_id)
        current = self.current
        if current is not None:
            return current
        adopted = self._adopted
        if adopted is not None and adopted.coordinator_id == self.self_id:
            # The others follow a claim of our previous incarnation: take it over under a new term.
            return self._claim()
        if now - self.started_at < self.config.startup_grace.total_seconds():
            return None
        me = Candidate(rank=self.self_rank, device_id=self.self_id)
        peers = (
            Candidate(rank=rank, device_id=device_id) for device_id, rank in alive.items() if device_id != self.self_id
        )
        if max(peers, default=me) > me:
            return None
        return self._claim()

    # ---- state ----

    @property
    def adopted(self) -> Claim | None:
        """The highest claim seen, live or not: what this node's heartbeats carry."""
        return self._adopted

    @property
    def current(self) -> Claim | None:
        """The adopted claim if its coordinator is this node or alive as of the last tick.

        A claim adopted less than ``new_claim_grace`` ago counts as alive too.
        """
        adopted = self._adopted
        if adopted is None:
            return None
        if adopted.coordinator_id == self.self_id:
            return adopted if adopted == self._own_claim else None
        if adopted.coordinator_id in self._alive:
            return adopted
        fresh = self._adopted_at is None or self._now - self._adopted_at < self.config.new_claim_grace.total_seconds()
        return adopted if fresh else None

    @property
    def term(self) -> Term:
        """The adopted claim's term; 0 before any. Heartbeats carry it with that claim's coordinator.

        A higher term learnt only from a command is not reported here (it has no claim to go with
        it), but this node's next claim exceeds it.
        """
        return Term(0) if self._adopted is None else self._adopted.term

    @property
    def coordinator_id(self) -> DeviceId | None:
        """The live coordinator, this node included; None while there is none."""
        current = self.current
        return None if current is None else current.coordinator_id

    @property
    def role(self) -> Role:
        current = self.current
        if current is None:
            return Role.CANDIDATE
        return Role.COORDINATOR if current.coordinator_id == self.self_id else Role.FOLLOWER

    def validate_command(self, term: int, coordinator_id: DeviceId) -> None:
        """Check a coordinator command's stamp before obeying it.

        A command is accepted when it comes from the coordinator of the adopted claim's term, or
        carries a higher term than any claim seen (its claim's heartbeat is still on its way); from
        then on commands of the older term are refused too.

        Raises:
            StaleTermError: the command's (term, coordinator) is older than the one followed.
        """
        followed = self._followed_stamp()
        if followed is None or term > followed[0]:
            self._command_floor = _CommandFloor(term=Term(term), coordinator_id=coordinator_id)
            return
        followed_term, followed_id = followed
        if term == followed_term and coordinator_id == followed_id:
            return
        raise StaleTermError(
            f"stale term {term} from {coordinator_id}: following term {followed_term} of {followed_id}"
        )

    # ---- internals ----

    def _claim(self) -> Claim:
        floor_term = 0 if self._command_floor is None else self._command_floor.term
        claim = Claim(
            term=Term(max(self.term, floor_term) + 1), coordinator_rank=self.self_rank, coordinator_id=self.self_id
        )
        self._own_claim = claim
        self._adopted = claim
        self._adopted_at = self._now
        return claim

    def _followed_stamp(self) -> tuple[Term, DeviceId] | None:
        adopted = self._adopted
        floor = self._command_floor
        if floor is not None and (adopted is None or floor.term > adopted.term):
            return floor.term, floor.coordinator_id
        if adopted is None:
            return None
        return adopted.term, adopted.coordinator_id
