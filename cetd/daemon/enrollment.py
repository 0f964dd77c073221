"""The CA holder's enrollment endpoint logic: invite tokens, join requests, approval and revocation.

The decisions and the signing live in `cetd.identity.admission`; this adapts them to the enrollment
and admin calls and publishes every new roster version to the members at once (push), so that a
revocation is enforced by every reachable member before `cetctl devices revoke` returns.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from cetd.errors import CetdError, IdentityError
from cetd.identity import Identity, SignedRoster, StateDir, load_csr
from cetd.identity.admission import (
    Admission,
    PendingRequests,
    admit_with_token,
    recertify_member,
    revoke_device,
)
from cetd.ids import DeviceId
from cetd.transport.peer_info import (
    Capabilities,
    EnrollRequest,
    EnrollResult,
    EnrollStatus,
    PeerInfo,
    PeerStatus,
)

from .roster_keeper import RosterKeeper

logger = logging.getLogger(__name__)


class Enroller:
    """Admits devices into the household; lives only on the device holding the CA key."""

    def __init__(
        self,
        identity: Identity,
        state: StateDir,
        roster: RosterKeeper,
        publish: Callable[[SignedRoster], Awaitable[None]],
    ) -> None:
        self._identity = identity
        self._state = state
        self._roster = roster
        self._publish = publish
        self._tokens = state.token_store()
        self._pending = PendingRequests(state)

    def invite(self, ttl: timedelta) -> tuple[str, float]:
        """Issue a one-time join token; returns the printable token and its expiry (epoch seconds)."""
        token = self._tokens.issue(ttl)
        logger.info("join token %s issued, expires in %s", token.token_id, ttl)
        return token.encode(), token.expires_at

    async def enroll(self, request: EnrollRequest, peer: str) -> EnrollResult:
        """A join request: admit with a token, re-certify a member, or file it for the owner."""
        try:
            _, device_id = load_csr(request.csr_pem)
        except IdentityError as error:
            return EnrollResult(status=EnrollStatus.REJECTED, device_id=DeviceId(""), reason=str(error))
        roster = self._roster.roster
        if device_id in roster.revoked:
            return EnrollResult(status=EnrollStatus.REJECTED, device_id=device_id,
                                reason=f"device {device_id} was revoked from this household")
        if roster.is_member(device_id):
            # Idempotent: a member asking again (lost reply, polling after approval) gets a certificate.
            return self._approved(recertify_member(self._state, request.csr_pem))
        if request.token_id:
            admission = admit_with_token(self._state, request.token_id, request.token_proof, request.csr_pem)
            await self._adopt(admission.signed_roster)
            logger.info("device %s (%s) joined with token %s", device_id, request.name, request.token_id)
            return self._approved(admission)
        pending = self._pending.add(request.csr_pem, peer)
        if pending.first_seen == pending.last_seen:
            logger.info("device %s (%s) from %s asks to join; verification code %s",
                        device_id, pending.name, peer, pending.verification_code)
        return EnrollResult(status=EnrollStatus.PENDING, device_id=device_id,
                            verification_code=pending.verification_code,
                            reason="waiting for the owner: cetctl devices approve " + device_id)

    def pending(self) -> list[PeerStatus]:
        return [
            PeerStatus(
                info=PeerInfo(device_id=p.device_id, name=p.name, address=p.address,
                              capabilities=Capabilities(cores=0, memory_bytes=0)),
                state="pending", verification_code=p.verification_code, last_seen_s=p.last_seen - p.first_seen,
            )
            for p in self._pending.waiting()
        ]

    async def approve(self, device_id: DeviceId) -> int:
        """Admit a pending device; it picks its certificate up on its next poll."""
        if self._roster.roster.is_member(device_id):
            return self._roster.version
        try:
            admission = self._pending.approve(device_id)
        except IdentityError as error:
            raise CetdError(f"{error} (see cetctl devices pending)") from None
        await self._adopt(admission.signed_roster)
        logger.info("device %s approved by the owner", device_id)
        return self._roster.version

    async def revoke(self, device_id: DeviceId) -> int:
        """Revoke a member for good, or refuse a pending device."""
        if self._pending.reject(device_id) and self._roster.roster.member(device_id) is None:
            logger.warning("join request of device %s refused", device_id)
            return self._roster.version
        if device_id in self._roster.roster.revoked:
            return self._roster.version
        try:
            signed = revoke_device(self._state, device_id)
        except IdentityError as error:
            raise CetdError(str(error)) from None
        await self._adopt(signed)
        logger.warning("device %s revoked", device_id)
        return self._roster.version

    async def _adopt(self, signed: SignedRoster) -> None:
        self._roster.accept(signed, already_stored=True)
        await self._publish(signed)

    def _approved(self, admission: Admission) -> EnrollResult:
        return EnrollResult(
            status=EnrollStatus.APPROVED,
            device_id=admission.device_id,
            certificate_pem=admission.certificate_pem,
            ca_certificate_pem=admission.ca_pem,
            roster=admission.signed_roster,
        )
