"""The CA holder's side of joining: invite tokens, pending requests, approval, signing and revocation.

A join request carries a CSR signed by the joining device's own key. With a valid token proof the
device is signed in at once; without one the request is filed as pending (persisted, so that a
restart loses nothing) until the owner approves it, after comparing the verification code shown on
both sides. Every change of membership is a new roster version, signed and pushed to the members.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from cetd.errors import CetdError, IdentityError, NotAuthorizedError
from cetd.identity import (
    Identity,
    Member,
    SignedRoster,
    StateDir,
    ca_fingerprint,
    certificate_pem,
    csr_der,
    issue_device_certificate,
    load_csr,
    verification_code,
    write_file_atomic,
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

MAX_PENDING = 64
"""Pending requests kept at most; the oldest are dropped so that strangers cannot fill the disk."""


@dataclass(frozen=True, slots=True)
class PendingRequest:
    device_id: str
    name: str
    csr_pem: str
    code: str
    peer: str
    first_seen: float
    cores: int
    memory_bytes: int
    accelerator: str


class Enroller:
    """Signs devices into the household; lives only on the device holding the CA key."""

    def __init__(
        self,
        identity: Identity,
        ca_key: ec.EllipticCurvePrivateKey,
        roster: RosterKeeper,
        state: StateDir,
        publish: Callable[[SignedRoster], Awaitable[None]],
    ) -> None:
        self._identity = identity
        self._ca_key = ca_key
        self._roster = roster
        self._publish = publish
        self._fingerprint = ca_fingerprint(identity.ca_certificate)
        self._tokens = state.token_store()
        self._pending_path = state.pending
        self._pending = self._load_pending()

    # -- invites ---------------------------------------------------------------------------------

    def invite(self, ttl: timedelta) -> tuple[str, float]:
        """Issue a one-time join token; returns the printable token and its expiry (epoch seconds)."""
        token = self._tokens.issue(ttl)
        logger.info("join token %s issued, expires in %s", token.token_id, ttl)
        return token.encode(), token.expires_at

    # -- enrollment ------------------------------------------------------------------------------

    async def enroll(self, request: EnrollRequest, peer: str) -> EnrollResult:
        """Handle a join request; see the module docstring."""
        try:
            csr, device_id = load_csr(request.csr_pem)
        except IdentityError as error:
            return EnrollResult(status=EnrollStatus.REJECTED, device_id=DeviceId(""), reason=str(error))
        roster = self._roster.roster
        if device_id in roster.revoked:
            return EnrollResult(status=EnrollStatus.REJECTED, device_id=device_id,
                                reason=f"device {device_id} was revoked from this household")
        if roster.is_member(device_id):
            # Idempotent: a member asking again (lost reply, polling after approval) gets a certificate.
            return self._approved(csr, device_id, request.name)
        if request.token_id:
            self._tokens.redeem(request.token_id, request.token_proof, csr_der(request.csr_pem))
            await self._add_member(device_id, request.name)
            logger.info("device %s (%s) joined with token %s", device_id, request.name, request.token_id)
            return self._approved(csr, device_id, request.name)
        code = verification_code(self._fingerprint, csr.public_key())
        if device_id not in self._pending:
            logger.info("device %s (%s) from %s asks to join; verification code %s",
                        device_id, request.name, peer, code)
            self._pending[device_id] = PendingRequest(
                device_id=device_id, name=request.name[:64], csr_pem=request.csr_pem.decode(), code=code,
                peer=peer, first_seen=time.time(), cores=request.capabilities.cores,
                memory_bytes=request.capabilities.memory_bytes,
                accelerator=request.capabilities.accelerator[:64],
            )
            while len(self._pending) > MAX_PENDING:
                oldest = min(self._pending.values(), key=lambda p: p.first_seen)
                del self._pending[DeviceId(oldest.device_id)]
            self._save_pending()
        return EnrollResult(status=EnrollStatus.PENDING, device_id=device_id, verification_code=code,
                            reason="waiting for the owner: cetctl devices approve " + device_id)

    def _approved(self, csr: x509.CertificateSigningRequest, device_id: DeviceId, name: str) -> EnrollResult:
        cert = issue_device_certificate(
            self._ca_key, self._identity.ca_certificate, csr.public_key(), name=name or device_id
        )
        return EnrollResult(
            status=EnrollStatus.APPROVED,
            device_id=device_id,
            certificate_pem=certificate_pem(cert),
            ca_certificate_pem=self._identity.ca_pem,
            roster=self._roster.signed,
        )

    async def _add_member(self, device_id: DeviceId, name: str) -> int:
        member = Member(device_id=device_id, name=name or device_id, added_at=time.time())
        signed = self._roster.amend(self._ca_key, lambda roster: roster.with_member(member))
        await self._publish(signed)
        return self._roster.version

    # -- owner decisions -------------------------------------------------------------------------

    def pending(self) -> list[PeerStatus]:
        return [
            PeerStatus(
                info=PeerInfo(
                    device_id=DeviceId(p.device_id), name=p.name, address=p.peer,
                    capabilities=Capabilities(cores=p.cores, memory_bytes=p.memory_bytes,
                                              accelerator=p.accelerator),
                ),
                state="pending",
                verification_code=p.code,
                last_seen_s=time.time() - p.first_seen,
            )
            for p in sorted(self._pending.values(), key=lambda p: p.first_seen)
        ]

    async def approve(self, device_id: DeviceId) -> int:
        """Admit a pending device; it picks its certificate up on its next poll."""
        request = self._pending.get(device_id)
        if request is None:
            if self._roster.roster.is_member(device_id):
                return self._roster.version
            raise CetdError(f"no pending request from device {device_id} (see cetctl devices pending)")
        if device_id in self._roster.roster.revoked:
            raise NotAuthorizedError(f"device {device_id} was revoked; it cannot be approved again")
        version = await self._add_member(device_id, request.name)
        del self._pending[device_id]
        self._save_pending()
        logger.info("device %s (%s) approved by the owner", device_id, request.name)
        return version

    async def revoke(self, device_id: DeviceId) -> int:
        """Revoke a member (or refuse a pending device) for good."""
        if device_id == self._identity.device_id:
            raise CetdError("the device holding the household CA cannot revoke itself")
        roster = self._roster.roster
        if device_id not in self._pending and roster.member(device_id) is None:
            raise CetdError(f"device {device_id} is neither a member nor pending")
        if self._pending.pop(device_id, None) is not None:
            self._save_pending()
        if device_id in roster.revoked:
            return roster.version
        signed = self._roster.amend(self._ca_key, lambda r: r.with_revoked(device_id))
        await self._publish(signed)
        logger.warning("device %s revoked", device_id)
        return self._roster.version

    # -- persistence -----------------------------------------------------------------------------

    def _load_pending(self) -> dict[DeviceId, PendingRequest]:
        if not self._pending_path.exists():
            return {}
        try:
            records = json.loads(self._pending_path.read_text())
            return {DeviceId(r["device_id"]): PendingRequest(**r) for r in records}
        except (ValueError, TypeError, KeyError) as error:
            logger.error("ignoring unreadable %s: %s", self._pending_path, error)
            return {}

    def _save_pending(self) -> None:
        data = json.dumps([asdict(p) for p in self._pending.values()], indent=1).encode()
        write_file_atomic(self._pending_path, data, 0o600)
