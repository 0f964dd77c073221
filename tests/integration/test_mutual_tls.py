"""Who may call a running daemon: every call but enrollment needs a current member's certificate."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cetd.identity import (
    StateDir,
    certificate_pem,
    create_household_ca,
    generate_private_key,
    issue_device_certificate,
    load_ca_key,
    load_identity,
    make_csr,
    private_key_pem,
    tls_server_name,
)
from cetd.ids import PROTOCOL_VERSION
from cetd.wire import household_pb2 as pb
from cetd.wire import household_pb2_grpc as pb_grpc
from tests.integration.rig import Household

pytestmark = pytest.mark.integration


async def _member_calls(channel: grpc.aio.Channel) -> dict[str, grpc.StatusCode]:
    """Try one call of every member service; return the status code each ended with."""
    household = pb_grpc.HouseholdStub(channel)
    admin = pb_grpc.AdminStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "Heartbeat": lambda: household.Heartbeat(pb.HeartbeatRequest(protocol_version=PROTOCOL_VERSION), timeout=3),
        "GetRoster": lambda: household.GetRoster(pb.GetRosterRequest(), timeout=3),
        "Command": lambda: household.Command(pb.CoordinatorCommand(term=99, coordinator_id="X"), timeout=3),
        "ListPeers": lambda: admin.ListPeers(pb.ListPeersRequest(), timeout=3),
        "CreateInvite": lambda: admin.CreateInvite(pb.CreateInviteRequest(ttl_s=60), timeout=3),
        "Health": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=3),
    }
    codes = {}
    for name, call in calls.items():
        try:
            await call()
            codes[name] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            codes[name] = error.code()
    return codes


def _channel(address: str, server_name: str, ca_pem: bytes, key_pem: bytes | None = None,
             chain_pem: bytes | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem,
                                               certificate_chain=chain_pem)
    return grpc.aio.secure_channel(address, credentials,
                                   options=[("grpc.ssl_target_name_override", server_name)])


@pytest.mark.timeout(120)
def test_strangers_are_refused_on_every_call_but_enrollment(tmp_path: Path) -> None:
    with Household.create(tmp_path, 2) as household:
        household.start_all()
        ca_daemon = household.daemons[0]
        state = StateDir(ca_daemon.state_dir)
        identity = load_identity(state)
        ca_key = load_ca_key(state)
        address = ca_daemon.address
        server_name = tls_server_name(identity.device_id)
        runtime = ca_daemon.runtime()
        assert runtime is not None
        enroll_address = f"127.0.0.1:{runtime['enroll_port']}"

        now = datetime.now(timezone.utc)
        expired_key = generate_private_key()
        expired = issue_device_certificate(
            ca_key, identity.ca_certificate, expired_key.public_key(), name="expired",
            not_valid_before=now - timedelta(days=10), not_valid_after=now - timedelta(days=1),
        )
        other_ca_key, other_ca = create_household_ca()
        foreign_key = generate_private_key()
        foreign = issue_device_certificate(other_ca_key, other_ca, foreign_key.public_key(), name="foreign")
        stranger_key = generate_private_key()  # a valid certificate of this CA, but never admitted
        stranger = issue_device_certificate(ca_key, identity.ca_certificate, stranger_key.public_key(),
                                            name="stranger")
        member = household.daemons[1]
        member_identity = load_identity(StateDir(member.state_dir))

        async def scenario() -> dict[str, dict[str, grpc.StatusCode]]:
            results = {}
            clients = {
                "no certificate": (None, None),
                "other CA": (private_key_pem(foreign_key), certificate_pem(foreign) + certificate_pem(other_ca)),
                "expired": (private_key_pem(expired_key), certificate_pem(expired)),
                "not a member": (private_key_pem(stranger_key), certificate_pem(stranger)),
                "member": (member_identity.key_pem, member_identity.cert_chain_pem),
            }
            for label, (key_pem, chain_pem) in clients.items():
                async with _channel(address, server_name, identity.ca_pem, key_pem, chain_pem) as channel:
                    results[label] = await _member_calls(channel)
            return results

        results = asyncio.run(scenario())
        for label in ("no certificate", "other CA", "expired"):
            # The TLS handshake itself fails: nothing of the service is reachable.
            assert set(results[label].values()) == {grpc.StatusCode.UNAVAILABLE}, (label, results[label])
        assert set(results["not a member"].values()) == {grpc.StatusCode.PERMISSION_DENIED}, results
        member_codes = results["member"]
        assert member_codes["GetRoster"] == grpc.StatusCode.OK
        assert member_codes["ListPeers"] == grpc.StatusCode.OK
        assert member_codes["Health"] == grpc.StatusCode.OK
        # A member may not speak for another device in a heartbeat (the request names nobody here).
        assert member_codes["Heartbeat"] == grpc.StatusCode.PERMISSION_DENIED

        async def member_extras() -> tuple[list[str], grpc.StatusCode, str]:
            async with _channel(address, server_name, identity.ca_pem, member_identity.key_pem,
                                member_identity.cert_chain_pem) as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                services: list[str] = []
                async for reply in stub.ServerReflectionInfo(iter([request])):
                    services = [s.name for s in reply.list_services_response.service]
                health = health_pb2_grpc.HealthStub(channel)
                status = await health.Check(health_pb2.HealthCheckRequest(service="cetd.v1.Household"))
                assert status.status == health_pb2.HealthCheckResponse.SERVING
            # The stranger cannot use reflection either.
            async with _channel(address, server_name, identity.ca_pem, private_key_pem(stranger_key),
                                certificate_pem(stranger)) as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                replies = []
                try:
                    async for reply in stub.ServerReflectionInfo(iter([request])):
                        replies.append(reply)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.aio.AioRpcError as error:
                    code, details = error.code(), f"{error.details()}: {error.debug_error_string()}"
            assert replies == []
            return services, code, details

        services, stranger_reflection, details = asyncio.run(member_extras())
        assert {"cetd.v1.Household", "cetd.v1.Admin", "grpc.health.v1.Health"} <= set(services)
        if stranger_reflection == grpc.StatusCode.INTERNAL and "execute_batch" in details:
            # The daemon refused the stream before the client had written its request, and the client's
            # late write failed on its own side (3 of 38 runs here); the daemon's log has the refusal.
            assert "refused /grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" in ca_daemon.log()
        else:
            assert stranger_reflection == grpc.StatusCode.PERMISSION_DENIED, details

        # Enrollment is the only call open without a member certificate, and without a token proof it
        # only files a pending request: the roster does not change.
        async def enroll_without_token() -> pb.EnrollResponse:
            credentials = grpc.ssl_channel_credentials(root_certificates=identity.ca_pem)
            async with grpc.aio.secure_channel(enroll_address, credentials,
                                               options=[("grpc.ssl_target_name_override", server_name)]) as ch:
                stub = pb_grpc.EnrollmentStub(ch)
                return await stub.Enroll(pb.EnrollRequest(csr_pem=make_csr(stranger_key, "stranger"),
                                                          name="stranger", token_id="0" * 16,
                                                          token_proof=b"\0" * 32), timeout=5)

        with pytest.raises(grpc.aio.AioRpcError) as bad_proof:
            asyncio.run(enroll_without_token())
        assert bad_proof.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "token" in (bad_proof.value.details() or "")

        async def enroll_pending() -> pb.EnrollResponse:
            credentials = grpc.ssl_channel_credentials(root_certificates=identity.ca_pem)
            async with grpc.aio.secure_channel(enroll_address, credentials,
                                               options=[("grpc.ssl_target_name_override", server_name)]) as ch:
                stub = pb_grpc.EnrollmentStub(ch)
                return await stub.Enroll(pb.EnrollRequest(csr_pem=make_csr(stranger_key, "stranger"),
                                                          name="stranger"), timeout=5)

        reply = asyncio.run(enroll_pending())
        assert reply.status == pb.EnrollResponse.PENDING
        assert not reply.certificate_pem
        view = ca_daemon.peers()
        assert view["roster_version"] == 1 + 1  # init + the provisioned member; the stranger is not in
        # The enrollment port serves nothing else.

        async def household_on_enroll_port() -> grpc.StatusCode:
            credentials = grpc.ssl_channel_credentials(root_certificates=identity.ca_pem)
            async with grpc.aio.secure_channel(enroll_address, credentials,
                                               options=[("grpc.ssl_target_name_override", server_name)]) as ch:
                try:
                    await pb_grpc.AdminStub(ch).ListPeers(pb.ListPeersRequest(), timeout=3)
                except grpc.aio.AioRpcError as error:
                    return error.code()
            return grpc.StatusCode.OK

        assert asyncio.run(household_on_enroll_port()) == grpc.StatusCode.UNIMPLEMENTED
