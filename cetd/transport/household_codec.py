"""Conversion between the household wire messages and the domain types in `peer_info`."""

from __future__ import annotations

import math
from collections.abc import Iterable

from cetd.identity import SignedRoster
from cetd.ids import DeviceId, Term
from cetd.transport.peer_info import (
    Capabilities,
    EnrollRequest,
    EnrollResult,
    EnrollStatus,
    Heartbeat,
    HouseholdView,
    MeasuredLink,
    PairLink,
    PeerInfo,
    PeerStatus,
)
from cetd.wire import household_pb2 as pb

_STATUS_TO_WIRE = {
    EnrollStatus.PENDING: pb.EnrollResponse.PENDING,
    EnrollStatus.APPROVED: pb.EnrollResponse.APPROVED,
    EnrollStatus.REJECTED: pb.EnrollResponse.REJECTED,
}
_STATUS_FROM_WIRE = {v: k for k, v in _STATUS_TO_WIRE.items()}


def capabilities_to_wire(caps: Capabilities) -> pb.Capabilities:
    return pb.Capabilities(
        cores=caps.cores, memory_bytes=caps.memory_bytes, accelerator=caps.accelerator, rank=caps.rank,
        block_seconds=caps.block_seconds, power_profile=caps.power_profile, machine=caps.machine,
        free_memory_bytes=caps.free_memory_bytes,
    )


def capabilities_from_wire(msg: pb.Capabilities) -> Capabilities:
    return Capabilities(
        cores=msg.cores, memory_bytes=msg.memory_bytes, accelerator=msg.accelerator, rank=msg.rank,
        block_seconds=msg.block_seconds, power_profile=msg.power_profile, machine=msg.machine,
        free_memory_bytes=msg.free_memory_bytes,
    )


def peer_to_wire(peer: PeerInfo) -> pb.DeviceInfo:
    return pb.DeviceInfo(
        device_id=peer.device_id,
        name=peer.name,
        address=peer.address,
        capabilities=capabilities_to_wire(peer.capabilities),
        enroll_address=peer.enroll_address,
    )


def peer_from_wire(msg: pb.DeviceInfo) -> PeerInfo:
    return PeerInfo(
        device_id=DeviceId(msg.device_id),
        name=msg.name,
        address=msg.address,
        capabilities=capabilities_from_wire(msg.capabilities),
        enroll_address=msg.enroll_address,
    )


def link_to_wire(link: MeasuredLink) -> pb.MeasuredLink:
    return pb.MeasuredLink(peer_id=link.peer_id, bandwidth_bytes_per_second=link.bandwidth_bytes_per_second,
                           latency_seconds=link.latency_seconds)


def links_from_wire(messages: Iterable[pb.MeasuredLink]) -> tuple[MeasuredLink, ...]:
    """The links a heartbeat reports; one that no probe could have measured (no peer, a bandwidth that is not
    positive and finite, a negative or non-finite latency) is dropped rather than planned on."""
    return tuple(MeasuredLink(peer_id=DeviceId(m.peer_id), bandwidth_bytes_per_second=m.bandwidth_bytes_per_second,
                              latency_seconds=m.latency_seconds)
                 for m in messages
                 if m.peer_id and 0 < m.bandwidth_bytes_per_second < math.inf and 0 <= m.latency_seconds < math.inf)


def heartbeat_to_request(hb: Heartbeat, protocol_version: int) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(
        protocol_version=protocol_version,
        sender=peer_to_wire(hb.sender),
        term=hb.term,
        coordinator_id=hb.coordinator_id or "",
        roster_version=hb.roster_version,
        coordinator_rank=hb.coordinator_rank,
        alive=[peer_to_wire(p) for p in hb.alive],
        uptime_s=hb.uptime_s,
        links=[link_to_wire(link) for link in hb.links],
    )


def heartbeat_from_request(msg: pb.HeartbeatRequest) -> Heartbeat:
    return Heartbeat(
        sender=peer_from_wire(msg.sender),
        term=Term(msg.term),
        coordinator_id=DeviceId(msg.coordinator_id) if msg.coordinator_id else None,
        roster_version=msg.roster_version,
        coordinator_rank=msg.coordinator_rank,
        alive=tuple(peer_from_wire(p) for p in msg.alive),
        uptime_s=msg.uptime_s,
        links=links_from_wire(msg.links),
    )


def heartbeat_to_response(hb: Heartbeat) -> pb.HeartbeatResponse:
    return pb.HeartbeatResponse(
        responder=peer_to_wire(hb.sender),
        term=hb.term,
        coordinator_id=hb.coordinator_id or "",
        roster_version=hb.roster_version,
        coordinator_rank=hb.coordinator_rank,
        alive=[peer_to_wire(p) for p in hb.alive],
        uptime_s=hb.uptime_s,
        links=[link_to_wire(link) for link in hb.links],
    )


def heartbeat_from_response(msg: pb.HeartbeatResponse) -> Heartbeat:
    return Heartbeat(
        sender=peer_from_wire(msg.responder),
        term=Term(msg.term),
        coordinator_id=DeviceId(msg.coordinator_id) if msg.coordinator_id else None,
        roster_version=msg.roster_version,
        coordinator_rank=msg.coordinator_rank,
        alive=tuple(peer_from_wire(p) for p in msg.alive),
        uptime_s=msg.uptime_s,
        links=links_from_wire(msg.links),
    )


def roster_to_wire(blob: SignedRoster) -> pb.Roster:
    return pb.Roster(document=blob.document, signature=blob.signature)


def roster_from_wire(msg: pb.Roster) -> SignedRoster:
    return SignedRoster(document=msg.document, signature=msg.signature)


def enroll_request_to_wire(req: EnrollRequest) -> pb.EnrollRequest:
    return pb.EnrollRequest(
        csr_pem=req.csr_pem,
        name=req.name,
        token_id=req.token_id,
        token_proof=req.token_proof,
        capabilities=capabilities_to_wire(req.capabilities),
    )


def enroll_request_from_wire(msg: pb.EnrollRequest) -> EnrollRequest:
    return EnrollRequest(
        csr_pem=msg.csr_pem,
        name=msg.name,
        token_id=msg.token_id,
        token_proof=msg.token_proof,
        capabilities=capabilities_from_wire(msg.capabilities),
    )


def enroll_result_to_wire(result: EnrollResult) -> pb.EnrollResponse:
    msg = pb.EnrollResponse(
        status=_STATUS_TO_WIRE[result.status],
        certificate_pem=result.certificate_pem,
        ca_certificate_pem=result.ca_certificate_pem,
        verification_code=result.verification_code,
        reason=result.reason,
        device_id=result.device_id,
    )
    if result.roster is not None:
        msg.roster.CopyFrom(roster_to_wire(result.roster))
    return msg


def enroll_result_from_wire(msg: pb.EnrollResponse) -> EnrollResult:
    if msg.status not in _STATUS_FROM_WIRE:
        return EnrollResult(status=EnrollStatus.REJECTED, device_id=DeviceId(msg.device_id),
                            reason="enrollment endpoint sent an unknown status")
    return EnrollResult(
        status=_STATUS_FROM_WIRE[msg.status],
        device_id=DeviceId(msg.device_id),
        certificate_pem=msg.certificate_pem,
        ca_certificate_pem=msg.ca_certificate_pem,
        roster=roster_from_wire(msg.roster) if msg.HasField("roster") else None,
        verification_code=msg.verification_code,
        reason=msg.reason,
    )


def peer_status_to_wire(status: PeerStatus) -> pb.PeerStatus:
    return pb.PeerStatus(
        device=peer_to_wire(status.info),
        state=status.state,
        role=status.role,
        term=status.term,
        last_seen_s=status.last_seen_s,
        verification_code=status.verification_code,
        bandwidth_bytes_per_second=status.bandwidth_bytes_per_second,
        latency_seconds=status.latency_seconds,
    )


def peer_status_from_wire(msg: pb.PeerStatus) -> PeerStatus:
    return PeerStatus(
        info=peer_from_wire(msg.device),
        state=msg.state,
        role=msg.role,
        term=Term(msg.term),
        last_seen_s=msg.last_seen_s,
        verification_code=msg.verification_code,
        bandwidth_bytes_per_second=msg.bandwidth_bytes_per_second,
        latency_seconds=msg.latency_seconds,
    )


def view_to_wire(view: HouseholdView) -> pb.ListPeersResponse:
    return pb.ListPeersResponse(
        peers=[peer_status_to_wire(p) for p in view.peers],
        self_id=view.self_id,
        term=view.term,
        coordinator_id=view.coordinator_id or "",
        roster_version=view.roster_version,
        links=[pb.PairLink(a=link.a, b=link.b, bandwidth_bytes_per_second=link.bandwidth_bytes_per_second,
                           latency_seconds=link.latency_seconds, measured_by=list(link.measured_by))
               for link in view.links],
    )


def view_from_wire(msg: pb.ListPeersResponse) -> HouseholdView:
    return HouseholdView(
        self_id=DeviceId(msg.self_id),
        term=Term(msg.term),
        coordinator_id=DeviceId(msg.coordinator_id) if msg.coordinator_id else None,
        roster_version=msg.roster_version,
        peers=tuple(peer_status_from_wire(p) for p in msg.peers),
        links=tuple(PairLink(a=link.a, b=link.b, bandwidth_bytes_per_second=link.bandwidth_bytes_per_second,
                             latency_seconds=link.latency_seconds, measured_by=tuple(link.measured_by))
                    for link in msg.links),
    )
