"""Admitting and revoking devices on the CA holder, by join token or by the owner's approval.

These are the CA holder's side of every membership change: check the request, issue the certificate, sign
the next roster version and store it before answering, so a crash never leaves a device holding a
certificate the roster does not list. Devices waiting for the owner (``cetctl devices pending``) are kept in
``pending.json`` with the verification code both screens show.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from cetd.errors import IdentityError
from cetd.identity.ca import ca_fingerprint, certificate_pem, issue_device_certificate
from cetd.identity.csr import csr_der, load_csr, requested_name
from cetd.identity.keys import PRIVATE_FILE_MODE, write_file_atomic
from cetd.identity.roster import Member, SignedRoster, sign_roster
from cetd.identity.state import (
    StateDir,
    load_ca_key,
    load_identity,
    load_roster,
    load_signed_roster,
    store_roster,
)
from cetd.identity.tls import verification_code
from cetd.ids import DeviceId

PENDING_TTL = timedelta(hours=24)
"""How long an unapproved request stays listed after it was last seen."""
PENDING_LIMIT = 64
"""Most requests kept; the oldest are dropped first, so a flood cannot fill the disk."""

# One CA holder process changes its roster from several threads (RPC handlers); serialize the
# read-modify-write of roster.json and pending.json.
_LOCK = threading.RLock()
_PENDING_FORMAT = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """What a newly admitted device receives."""

    device_id: DeviceId
    certificate_pem: bytes
    ca_pem: bytes
    signed_roster: SignedRoster


def _certify(state_dir: StateDir, csr_pem: bytes, *, name: str | None, kind: str, now: float, add: bool) -> Admission:
    request, device_id = load_csr(csr_pem)
    device_name = name or requested_name(request)
    identity = load_identity(state_dir)
    ca_key = load_ca_key(state_dir)
    roster = load_roster(state_dir)
    if device_id in roster.revoked:
        raise IdentityError(f"device {device_id} was revoked; it can only return as a new device with a new key")
    if add:
        member = Member(device_id=device_id, name=device_name, kind=kind, added_at=now)
        signed = sign_roster(roster.with_member(member), ca_key)
        store_roster(state_dir, signed)
    elif roster.is_member(device_id):
        signed = load_signed_roster(state_dir)
    else:
        raise IdentityError(f"device {device_id} is not a member of this household")
    cert = issue_device_certificate(ca_key, identity.ca_certificate, request.public_key(), name=device_name)
    return Admission(
        device_id=device_id,
        certificate_pem=certificate_pem(cert),
        ca_pem=identity.ca_pem,
        signed_roster=signed,
    )


def admit_device(
    state_dir: StateDir,
    csr_pem: bytes,
    *,
    name: str | None = None,
    kind: str = "device",
    now: float | None = None,
) -> Admission:
    """Admit the device that sent ``csr_pem``: add it to the roster (next version, stored) and certify it.

    Args:
        name: the member's name; defaults to the name in the request.
        kind: ``"device"`` or ``"client"``.

    Raises:
        IdentityError: this is not the CA holder, the request is malformed, or the device was revoked.
    """
    with _LOCK:
        return _certify(state_dir, csr_pem, name=name, kind=kind, now=_now(now), add=True)


def admit_with_token(
    state_dir: StateDir, token_id: str, proof: bytes, csr_pem: bytes, *, now: float | None = None
) -> Admission:
    """Redeem join token ``token_id`` for the request ``csr_pem`` and admit its device.

    Raises:
        TokenError: the token is unknown, expired, used, or the proof does not match.
        IdentityError: as `admit_device`.
    """
    moment = _now(now)
    with _LOCK:
        _, device_id = load_csr(csr_pem)
        if device_id in load_roster(state_dir).revoked:
            raise IdentityError(f"device {device_id} was revoked; it can only return with a new key")
        state_dir.token_store().redeem(token_id, proof, csr_der(csr_pem), moment)
        return _certify(state_dir, csr_pem, name=None, kind="device", now=moment, add=True)


def recertify_member(state_dir: StateDir, csr_pem: bytes) -> Admission:
    """Issue a fresh certificate to a device that is already a member (e.g. one polling after approval),
    without changing the roster.

    Raises:
        IdentityError: the device is not a member, or was revoked.
    """
    with _LOCK:
        return _certify(state_dir, csr_pem, name=None, kind="device", now=_now(None), add=False)


def revoke_device(state_dir: StateDir, device_id: DeviceId) -> SignedRoster:
    """Revoke ``device_id``: sign and store the next roster version, which members then refuse it by.

    Raises:
        IdentityError: not the CA holder, the device is unknown or already revoked, or it is this device.
    """
    with _LOCK:
        identity = load_identity(state_dir)
        roster = load_roster(state_dir)
        if device_id == identity.device_id:
            raise IdentityError("the device holding the household CA cannot revoke itself")
        if roster.member(device_id) is None:
            raise IdentityError(f"device {device_id} is not a member of this household")
        if device_id in roster.revoked:
            raise IdentityError(f"device {device_id} is already revoked")
        signed = sign_roster(roster.with_revoked(device_id), load_ca_key(state_dir))
        store_roster(state_dir, signed)
        return signed


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingRequest:
    """A device asking to join, waiting for the owner's approval."""

    device_id: DeviceId
    name: str
    csr_pem: bytes
    verification_code: str
    """Shown by ``cetctl devices pending`` and on the new device; the owner compares them."""
    address: str
    first_seen: float
    last_seen: float


class PendingRequests:
    """The join requests waiting for approval on the CA holder, kept in ``pending.json`` (mode 0600)."""

    def __init__(self, state_dir: StateDir, *, ttl: timedelta = PENDING_TTL, limit: int = PENDING_LIMIT) -> None:
        self._state_dir = state_dir
        self._path: Path = state_dir.pending
        self._ttl = ttl
        self._limit = limit

    def add(self, csr_pem: bytes, address: str, now: float | None = None) -> PendingRequest:
        """Record (or refresh) the request ``csr_pem`` that arrived from ``address``.

        Raises:
            IdentityError: the request is malformed, or the device is already a member or was revoked.
        """
        moment = _now(now)
        request, device_id = load_csr(csr_pem)
        with _LOCK:
            identity = load_identity(self._state_dir)
            roster = load_roster(self._state_dir)
            if device_id in roster.revoked:
                raise IdentityError(f"device {device_id} was revoked; it can only return with a new key")
            if roster.is_member(device_id):
                raise IdentityError(f"device {device_id} is already a member")
            records = self._read(moment)
            previous = records.get(device_id)
            record = PendingRequest(
                device_id=device_id,
                name=requested_name(request),
                csr_pem=csr_pem,
                verification_code=verification_code(ca_fingerprint(identity.ca_certificate), request.public_key()),
                address=address,
                first_seen=previous.first_seen if previous else moment,
                last_seen=moment,
            )
            records[device_id] = record
            self._write(records)
            return record

    def waiting(self, now: float | None = None) -> tuple[PendingRequest, ...]:
        """Return the waiting requests, oldest first."""
        with _LOCK:
            records = self._read(_now(now))
        return tuple(sorted(records.values(), key=lambda r: (r.first_seen, r.device_id)))

    def approve(
        self, device_id: DeviceId, *, name: str | None = None, kind: str = "device", now: float | None = None
    ) -> Admission:
        """Admit the waiting device ``device_id`` and drop its request.

        Raises:
            IdentityError: no such request is waiting, or as `admit_device`.
        """
        moment = _now(now)
        with _LOCK:
            records = self._read(moment)
            record = records.get(device_id)
            if record is None:
                raise IdentityError(f"no join request from device {device_id} is waiting")
            admission = admit_device(self._state_dir, record.csr_pem, name=name, kind=kind, now=moment)
            del records[device_id]
            self._write(records)
            return admission

    def reject(self, device_id: DeviceId, now: float | None = None) -> bool:
        """Drop the request of ``device_id``; return whether one was waiting."""
        with _LOCK:
            records = self._read(_now(now))
            if records.pop(device_id, None) is None:
                return False
            self._write(records)
            return True

    def _read(self, now: float) -> dict[DeviceId, PendingRequest]:
        try:
            document: Any = json.loads(self._path.read_bytes())
        except FileNotFoundError:
            return {}
        try:
            if document["format"] != _PENDING_FORMAT:
                raise IdentityError(f"{self._path} has unsupported format {document['format']}")
            records = [
                PendingRequest(
                    device_id=DeviceId(entry["device_id"]),
                    name=str(entry["name"]),
                    csr_pem=str(entry["csr_pem"]).encode("ascii"),
                    verification_code=str(entry["verification_code"]),
                    address=str(entry["address"]),
                    first_seen=float(entry["first_seen"]),
                    last_seen=float(entry["last_seen"]),
                )
                for entry in document["requests"]
            ]
        except (ValueError, TypeError, KeyError) as error:
            raise IdentityError(f"{self._path} is corrupt: {error!r}") from None
        horizon = now - self._ttl.total_seconds()
        return {r.device_id: r for r in records if r.last_seen > horizon}

    def _write(self, records: dict[DeviceId, PendingRequest]) -> None:
        newest = sorted(records.values(), key=lambda r: r.last_seen, reverse=True)[: self._limit]
        document = {
            "format": _PENDING_FORMAT,
            "requests": [
                {
                    "device_id": r.device_id,
                    "name": r.name,
                    "csr_pem": r.csr_pem.decode("ascii"),
                    "verification_code": r.verification_code,
                    "address": r.address,
                    "first_seen": r.first_seen,
                    "last_seen": r.last_seen,
                }
                for r in sorted(newest, key=lambda r: (r.first_seen, r.device_id))
            ],
        }
        write_file_atomic(self._path, json.dumps(document, sort_keys=True, indent=1).encode(), PRIVATE_FILE_MODE)


def _now(now: float | None) -> float:
    return time.time() if now is None else now
