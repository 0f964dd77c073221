"""The daemon's gRPC endpoints: the mutual-TLS member endpoint and the enrollment endpoint.

Servicers here only translate: wire message → domain type → `HouseholdHandler` → wire message, and
map `CetdError`s to gRPC status codes with their sentence. All decisions live in the handler.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cetd.errors import CetdError, UnavailableError
from cetd.identity import SignedRoster
from cetd.ids import PROTOCOL_VERSION, DeviceId, Term
from cetd.transport import household_codec as codec
from cetd.transport.auth import CALLER, MemberAuthInterceptor, MemberAuthorizer, status_for
from cetd.transport.credentials import (
    TlsMaterial,
    mutual_tls_server_credentials,
    server_only_tls_credentials,
    server_options,
)
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

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PROBE_BYTES = 4 * 1024 * 1024
"""Largest link-probe reply: enough to time a link, too little to be a way to load a daemon."""
Context = grpc.aio.ServicerContext[Any, Any]


class HouseholdHandler(MemberAuthorizer, Protocol):
    """What the daemon does with household calls from authenticated members."""

    async def on_heartbeat(self, heartbeat: Heartbeat) -> Heartbeat: ...
    def probe_refusal(self) -> str:
        """Why this device would answer a link probe late now (it trains or times itself), or ""."""
    def signed_roster(self) -> SignedRoster: ...
    async def on_roster(self, roster: SignedRoster) -> int: ...
    async def on_command(self, command: CommandEnvelope) -> Term: ...
    async def list_peers(self) -> HouseholdView: ...
    async def create_invite(self, ttl: timedelta) -> tuple[str, float]: ...
    async def list_pending(self) -> list[PeerStatus]: ...
    async def approve(self, device_id: DeviceId) -> int: ...
    async def revoke(self, device_id: DeviceId) -> int: ...


class EnrollmentHandler(Protocol):
    """What the CA holder does with a join request from a device that has no certificate yet."""

    async def enroll(self, request: EnrollRequest, peer: str) -> EnrollResult: ...


async def answer(context: Context, call: Awaitable[T]) -> T:
    """Await a handler call, turning an expected failure into a gRPC status with its sentence."""
    try:
        return await call
    except CetdError as error:
        logger.info("call refused: %s", error)
        await context.abort(status_for(error), str(error))
        raise  # unreachable: abort raises


class _HouseholdServicer(pb_grpc.HouseholdServicer):
    def __init__(self, handler: HouseholdHandler) -> None:
        self._handler = handler

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Context) -> pb.HeartbeatResponse:
        if request.protocol_version != PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version} not supported (this daemon speaks {PROTOCOL_VERSION})",
            )
        heartbeat = codec.heartbeat_from_request(request)
        if heartbeat.sender.device_id != CALLER.get():
            # A member may only speak for itself: its certificate names who it is.
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"heartbeat claims device {heartbeat.sender.device_id} but the certificate is {CALLER.get()}",
            )
        reply = await answer(context, self._handler.on_heartbeat(heartbeat))
        return codec.heartbeat_to_response(reply)

    async def Probe(self, request: pb.ProbeRequest, context: Context) -> pb.ProbeReply:
        if request.reply_bytes > MAX_PROBE_BYTES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"probe replies are at most {MAX_PROBE_BYTES} bytes")
        refusal = self._handler.probe_refusal()
        if refusal:
            # Answered late, the probe would time this device's load and be taken for the link's speed.
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"not probed now: {refusal}")
        return pb.ProbeReply(payload=bytes(request.reply_bytes))

    async def GetRoster(self, request: pb.GetRosterRequest, context: Context) -> pb.Roster:
        return codec.roster_to_wire(self._handler.signed_roster())

    async def PushRoster(self, request: pb.Roster, context: Context) -> pb.PushRosterResponse:
        version = await answer(context, self._handler.on_roster(codec.roster_from_wire(request)))
        return pb.PushRosterResponse(version=version)

    async def Command(self, request: pb.CoordinatorCommand, context: Context) -> pb.CommandAck:
        if request.coordinator_id != CALLER.get():
            # Only the coordinator itself may issue its commands; a member cannot forge a higher term.
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"command signed as coordinator {request.coordinator_id!r} but sent by {CALLER.get()}",
            )
        command = CommandEnvelope(
            term=Term(request.term),
            coordinator_id=DeviceId(request.coordinator_id),
            kind=request.kind,
            payload=request.payload,
        )
        term = await answer(context, self._handler.on_command(command))
        return pb.CommandAck(term=term)


class _AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, handler: HouseholdHandler) -> None:
        self._handler = handler

    async def ListPeers(self, request: pb.ListPeersRequest, context: Context) -> pb.ListPeersResponse:
        return codec.view_to_wire(await answer(context, self._handler.list_peers()))

    async def CreateInvite(
        self, request: pb.CreateInviteRequest, context: Context
    ) -> pb.CreateInviteResponse:
        token, expires_at = await answer(
            context, self._handler.create_invite(timedelta(seconds=request.ttl_s or 3600))
        )
        return pb.CreateInviteResponse(token=token, expires_at=expires_at)

    async def ListPending(
        self, request: pb.ListPendingRequest, context: Context
    ) -> pb.ListPendingResponse:
        pending = await answer(context, self._handler.list_pending())
        return pb.ListPendingResponse(pending=[codec.peer_status_to_wire(p) for p in pending])

    async def Approve(self, request: pb.DeviceRequest, context: Context) -> pb.DeviceResponse:
        version = await answer(context, self._handler.approve(DeviceId(request.device_id)))
        return pb.DeviceResponse(device_id=request.device_id, roster_version=version)

    async def Revoke(self, request: pb.DeviceRequest, context: Context) -> pb.DeviceResponse:
        version = await answer(context, self._handler.revoke(DeviceId(request.device_id)))
        return pb.DeviceResponse(device_id=request.device_id, roster_version=version)


class _EnrollmentServicer(pb_grpc.EnrollmentServicer):
    def __init__(self, handler: EnrollmentHandler) -> None:
        self._handler = handler

    async def Enroll(self, request: pb.EnrollRequest, context: Context) -> pb.EnrollResponse:
        if len(request.csr_pem) > 16 * 1024 or len(request.name) > 256:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "enrollment request too large")
        result = await answer(
            context, self._handler.enroll(codec.enroll_request_from_wire(request), context.peer())
        )
        return codec.enroll_result_to_wire(result)


ServicerAdder = Callable[[grpc.aio.Server], None]
"""Adds one more service to the member endpoint (e.g. the jobs service); called before start."""


class MemberEndpoint:
    """The mutual-TLS gRPC server of a member, with health and reflection; an async context manager."""

    def __init__(
        self,
        handler: HouseholdHandler,
        material: TlsMaterial,
        *,
        host: str,
        port: int,
        extra_services: Sequence[ServicerAdder] = (),
        extra_service_names: Sequence[str] = (),
    ) -> None:
        self._server = grpc.aio.server(
            interceptors=[MemberAuthInterceptor(handler)], options=server_options()
        )
        pb_grpc.add_HouseholdServicer_to_server(_HouseholdServicer(handler), self._server)
        pb_grpc.add_AdminServicer_to_server(_AdminServicer(handler), self._server)
        for add in extra_services:
            add(self._server)
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # set at import time only
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [
            pb.DESCRIPTOR.services_by_name["Household"].full_name,
            pb.DESCRIPTOR.services_by_name["Admin"].full_name,
            *extra_service_names,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, self._server)
        self._names = names
        self.port = self._server.add_secure_port(f"{host}:{port}", mutual_tls_server_credentials(material))
        if self.port == 0:
            raise UnavailableError(f"cannot listen on {host}:{port} (address in use?)")

    async def __aenter__(self) -> MemberEndpoint:
        await self._server.start()
        for name in ("", *self._names):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace=1.0)


class EnrollmentEndpoint:
    """The server-authenticated TLS endpoint that serves only `Enrollment.Enroll`."""

    def __init__(self, handler: EnrollmentHandler, material: TlsMaterial, *, host: str, port: int) -> None:
        self._server = grpc.aio.server(options=server_options())
        pb_grpc.add_EnrollmentServicer_to_server(_EnrollmentServicer(handler), self._server)
        self.port = self._server.add_secure_port(f"{host}:{port}", server_only_tls_credentials(material))
        if self.port == 0:
            raise UnavailableError(f"cannot listen on {host}:{port} (address in use?)")

    async def __aenter__(self) -> EnrollmentEndpoint:
        await self._server.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._server.stop(grace=0.5)
