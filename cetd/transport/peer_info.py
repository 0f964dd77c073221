"""Domain types of the control plane, free of protobuf: what the daemon and cluster logic see.

`household_codec` converts these to and from wire messages; nothing above `transport` touches protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from cetd.identity import SignedRoster
from cetd.ids import DeviceId, Term


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    """What a device brings to training, as advertised and shown by `cetctl peers`."""

    cores: int
    memory_bytes: int
    accelerator: str = ""
    """"" when none, else a short description such as ``cuda:Orin``."""
    rank: float = 0.0
    """Election rank: higher wins, ties broken by device ID."""
    block_seconds: float = 0.0
    """Profiled seconds of a reference block's forward+backward per sample; 0 until measured."""
    power_profile: str = ""
    """Power profile name for the energy model."""
    machine: str = ""
    """An opaque digest of the kernel this device runs on (`cetd.daemon.capabilities.machine_digest`): equal
    for daemons sharing one machine; "" when unknown."""
    free_memory_bytes: int = 0
    """Memory a new worker could use now, at most ``memory_bytes`` (`cetd.daemon.capabilities.free_memory`);
    0 until measured. The planner offers the smaller of the two."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerInfo:
    """How to reach one device and what it offers."""

    device_id: DeviceId
    name: str
    address: str
    """``host:port`` of its mutual-TLS endpoint."""
    capabilities: Capabilities
    enroll_address: str = ""
    """``host:port`` of its enrollment endpoint; set only on the device holding the household CA."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasuredLink:
    """One device's link to a peer, as that device's probes measured it (`cetd.cluster.link_probes`)."""

    peer_id: DeviceId
    bandwidth_bytes_per_second: float
    latency_seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """One side of a heartbeat exchange: who I am, whom I follow, what roster I hold, whom I see."""

    sender: PeerInfo
    term: Term
    coordinator_id: DeviceId | None
    roster_version: int
    coordinator_rank: float = 0.0
    alive: tuple[PeerInfo, ...] = ()
    uptime_s: float = 0.0
    links: tuple[MeasuredLink, ...] = ()
    """The sender's links to its peers as its probes measured them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandEnvelope:
    """A coordinator command: members act on it only if its term is current."""

    term: Term
    coordinator_id: DeviceId
    kind: str
    payload: bytes = b""


class EnrollStatus(Enum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrollRequest:
    csr_pem: bytes
    name: str
    capabilities: Capabilities
    token_id: str = ""
    token_proof: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrollResult:
    status: EnrollStatus
    device_id: DeviceId
    certificate_pem: bytes = b""
    ca_certificate_pem: bytes = b""
    roster: SignedRoster | None = None
    verification_code: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerStatus:
    """One row of `cetctl peers`."""

    info: PeerInfo
    state: str
    """alive, suspect, dead, pending or revoked."""
    role: str = ""
    term: int = 0
    last_seen_s: float = -1.0
    verification_code: str = ""
    bandwidth_bytes_per_second: float = 0.0
    """Measured from the answering daemon to this peer; 0 when not measured yet."""
    latency_seconds: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PairLink:
    """The link between devices ``a`` and ``b`` (``a < b``) as `cetctl peers` shows it
    (`cetd.cluster.link_probes.LinkReading`)."""

    a: str
    b: str
    bandwidth_bytes_per_second: float
    latency_seconds: float
    measured_by: tuple[str, ...] = ()
    """The ends whose probes measured it; () where it is inferred from both ends' links to the viewer."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HouseholdView:
    """What `cetctl peers` shows: every member as this daemon sees it."""

    self_id: DeviceId
    term: Term
    coordinator_id: DeviceId | None
    roster_version: int
    peers: tuple[PeerStatus, ...] = field(default_factory=tuple)
    links: tuple[PairLink, ...] = ()
    """Every pair's link that this daemon knows, measured or inferred."""
