"""Typed clients for the household endpoints: peers calling peers, cetctl calling a daemon, joiners enrolling.

Each `PeerClient` keeps one grpc.aio channel for the life of the peer; gRPC errors come back as
`CetdError`s carrying the server's sentence.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from datetime import timedelta
from types import TracebackType
from typing import TypeVar

import grpc

from cetd.errors import CetdError, JobError, NotAuthorizedError, StaleTermError, UnavailableError
from cetd.identity import SignedRoster
from cetd.ids import PROTOCOL_VERSION, DeviceId, Term
from cetd.transport import household_codec as codec
from cetd.transport.credentials import TlsMaterial, channel_options, mutual_tls_channel_credentials
from cetd.transport.peer_info import (
    CommandEnvelope,
    EnrollRequest,
    EnrollResult,
    Heartbeat,
    HouseholdView,
    PeerStatus,
)
from cetd.wire import household_pb2 as pb
from cetd.wire import household_pb2_grpc as pb_grpc

T = TypeVar("T")

DEFAULT_TIMEOUT = timedelta(seconds=5)


def error_from_rpc(error: grpc.aio.AioRpcError, target: str) -> CetdError:
    """Turn a failed call into the `CetdError` the server meant, keeping its sentence."""
    code = error.code()
    details = error.details() or code.name.lower()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnavailableError(f"{target} unreachable: {details}")
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return NotAuthorizedError(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION and "stale term" in details:
        return StaleTermError(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return JobError(details)
    return CetdError(details)


async def call_rpc(target: str, call: Awaitable[T]) -> T:
    """Await a call; failures become `CetdError`s.

    A call cancelled because its channel was closed under it (the peer moved to a new address, or the
    client is being replaced) is a failure of that call, not a cancellation of the caller: it becomes
    `UnavailableError`. A cancellation of the calling task itself propagates as usual.
    """
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        raise error_from_rpc(error, target) from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)
        if cancelling is not None and not cancelling():
            raise UnavailableError(f"{target}: the call was cancelled (its channel closed)") from None
        raise


class PeerClient:
    """Calls one member's mutual-TLS endpoint, identified by its device's TLS server name."""

    def __init__(self, address: str, tls_server_name: str, material: TlsMaterial) -> None:
        self.address = address
        self.channel = grpc.aio.secure_channel(
            address, mutual_tls_channel_credentials(material), options=channel_options(tls_server_name)
        )
        self._household = pb_grpc.HouseholdStub(self.channel)
        self._admin = pb_grpc.AdminStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(grace=None)

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def heartbeat(self, heartbeat: Heartbeat, timeout: timedelta = DEFAULT_TIMEOUT) -> Heartbeat:
        request = codec.heartbeat_to_request(heartbeat, PROTOCOL_VERSION)
        reply = await call_rpc(self.address, self._household.Heartbeat(request, timeout=timeout.total_seconds()))
        return codec.heartbeat_from_response(reply)

    async def probe(self, send_bytes: int, reply_bytes: int, timeout: timedelta = DEFAULT_TIMEOUT) -> float:
        """Time one exchange of ``send_bytes`` out and ``reply_bytes`` back; return seconds."""
        request = pb.ProbeRequest(payload=bytes(send_bytes), reply_bytes=reply_bytes)
        started = time.perf_counter()
        await call_rpc(self.address, self._household.Probe(request, timeout=timeout.total_seconds()))
        return time.perf_counter() - started

    async def get_roster(self, timeout: timedelta = DEFAULT_TIMEOUT) -> SignedRoster:
        reply = await call_rpc(
            self.address, self._household.GetRoster(pb.GetRosterRequest(), timeout=timeout.total_seconds())
        )
        return codec.roster_from_wire(reply)

    async def push_roster(self, roster: SignedRoster, timeout: timedelta = DEFAULT_TIMEOUT) -> int:
        reply = await call_rpc(
            self.address,
            self._household.PushRoster(codec.roster_to_wire(roster), timeout=timeout.total_seconds()),
        )
        return reply.version

    async def command(self, command: CommandEnvelope, timeout: timedelta = DEFAULT_TIMEOUT) -> Term:
        request = pb.CoordinatorCommand(
            term=command.term, coordinator_id=command.coordinator_id, kind=command.kind,
            payload=command.payload,
        )
        reply = await call_rpc(self.address, self._household.Command(request, timeout=timeout.total_seconds()))
        return Term(reply.term)

    async def list_peers(self, timeout: timedelta = DEFAULT_TIMEOUT) -> HouseholdView:
        reply = await call_rpc(
            self.address, self._admin.ListPeers(pb.ListPeersRequest(), timeout=timeout.total_seconds())
        )
        return codec.view_from_wire(reply)

    async def create_invite(self, ttl: timedelta, timeout: timedelta = DEFAULT_TIMEOUT) -> tuple[str, float]:
        reply = await call_rpc(
            self.address,
            self._admin.CreateInvite(
                pb.CreateInviteRequest(ttl_s=ttl.total_seconds()), timeout=timeout.total_seconds()
            ),
        )
        return reply.token, reply.expires_at

    async def list_pending(self, timeout: timedelta = DEFAULT_TIMEOUT) -> list[PeerStatus]:
        reply = await call_rpc(
            self.address, self._admin.ListPending(pb.ListPendingRequest(), timeout=timeout.total_seconds())
        )
        return [codec.peer_status_from_wire(p) for p in reply.pending]

    async def approve(self, device_id: DeviceId, timeout: timedelta = DEFAULT_TIMEOUT) -> int:
        reply = await call_rpc(
            self.address,
            self._admin.Approve(pb.DeviceRequest(device_id=device_id), timeout=timeout.total_seconds()),
        )
        return reply.roster_version

    async def revoke(self, device_id: DeviceId, timeout: timedelta = DEFAULT_TIMEOUT) -> int:
        reply = await call_rpc(
            self.address,
            self._admin.Revoke(pb.DeviceRequest(device_id=device_id), timeout=timeout.total_seconds()),
        )
        return reply.roster_version


async def enroll(
    address: str,
    *,
    ca_pem: bytes,
    tls_server_name: str,
    request: EnrollRequest,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> EnrollResult:
    """Send a join request to the CA holder's enrollment endpoint over server-authenticated TLS.

    Args:
        address: ``host:port`` of the enrollment endpoint.
        ca_pem: the household CA, already checked against the join token's fingerprint (or, for owner
            approval, trusted on first use and confirmed by the verification code).
        tls_server_name: the server's name as found in its certificate.
    """
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(
        address, credentials, options=channel_options(tls_server_name)
    ) as channel:
        stub = pb_grpc.EnrollmentStub(channel)
        reply = await call_rpc(
            address, stub.Enroll(codec.enroll_request_to_wire(request), timeout=timeout.total_seconds())
        )
    return codec.enroll_result_from_wire(reply)
