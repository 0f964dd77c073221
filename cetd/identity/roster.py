"""The household roster: which devices are members and which were revoked, signed by the household CA.

The roster is the source of truth for "may this peer talk to me": a valid certificate alone is not enough,
because a revoked device still holds one. Every change bumps the version, so members exchanging rosters keep
the newest; only the CA holder can sign a roster, so no member can add itself or undo a revocation.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, replace
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from cetd.errors import IdentityError
from cetd.identity.ca import household_id
from cetd.ids import DeviceId, HouseholdId

MEMBER_KINDS = ("device", "client")
"""``device``: a daemon that trains; ``client``: a laptop with a certificate only to control the household."""

_ROSTER_FORMAT = 1
_SIGNATURE_CONTEXT = b"cetd-roster-v1\0"


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """One device admitted to the household."""

    device_id: DeviceId
    name: str
    """Human name, as shown by ``cetctl peers``."""
    kind: str = "device"
    """One of `MEMBER_KINDS`."""
    added_at: float
    """When the CA holder admitted it, seconds since the epoch."""

    def __post_init__(self) -> None:
        if self.kind not in MEMBER_KINDS:
            raise IdentityError(f"member kind {self.kind!r} is not one of {', '.join(MEMBER_KINDS)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Roster:
    """A version of the member list; members are kept sorted by device ID so equal rosters compare equal."""

    version: int
    household_id: HouseholdId
    members: tuple[Member, ...] = ()
    revoked: tuple[DeviceId, ...] = ()
    """Devices that must be refused even though they hold a certificate."""

    def __post_init__(self) -> None:
        if self.version < 1:
            raise IdentityError(f"roster version must be at least 1, not {self.version}")
        ids = [member.device_id for member in self.members]
        if len(set(ids)) != len(ids):
            raise IdentityError("roster lists a device twice")
        # Canonical order, so that to_json is deterministic and equality ignores insertion order.
        object.__setattr__(self, "members", tuple(sorted(self.members, key=lambda m: m.device_id)))
        object.__setattr__(self, "revoked", tuple(sorted(set(self.revoked))))

    def is_member(self, device_id: DeviceId) -> bool:
        """Return whether ``device_id`` is listed and not revoked."""
        return device_id not in self.revoked and any(m.device_id == device_id for m in self.members)

    def member(self, device_id: DeviceId) -> Member | None:
        """Return the entry of ``device_id`` (revoked or not), or None."""
        return next((m for m in self.members if m.device_id == device_id), None)

    def active_members(self) -> tuple[Member, ...]:
        """Return the members that are not revoked."""
        return tuple(m for m in self.members if m.device_id not in self.revoked)

    def with_member(self, member: Member) -> Roster:
        """Return the next version with ``member`` added (or its entry replaced, e.g. renamed).

        Raises:
            IdentityError: the device was revoked; it must join again with a new key.
        """
        if member.device_id in self.revoked:
            raise IdentityError(
                f"device {member.device_id} was revoked; it can only return as a new device with a new key"
            )
        others = tuple(m for m in self.members if m.device_id != member.device_id)
        return replace(self, version=self.version + 1, members=(*others, member))

    def with_revoked(self, device_id: DeviceId) -> Roster:
        """Return the next version with ``device_id`` revoked (its entry stays so its name is still shown)."""
        return replace(self, version=self.version + 1, revoked=(*self.revoked, device_id))

    def to_json(self) -> bytes:
        """Return the canonical JSON document (sorted keys, no spaces, UTF-8) that the CA signs."""
        document = {
            "format": _ROSTER_FORMAT,
            "version": self.version,
            "household_id": self.household_id,
            "members": [
                {"device_id": m.device_id, "name": m.name, "kind": m.kind, "added_at": m.added_at} for m in self.members
            ],
            "revoked": list(self.revoked),
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Roster:
        """Parse a document made by `to_json`.

        Raises:
            IdentityError: the document is not a roster.
        """
        try:
            document: Any = json.loads(data)
            if document["format"] != _ROSTER_FORMAT:
                raise IdentityError(f"roster format {document['format']} is not supported")
            members = tuple(
                Member(
                    device_id=DeviceId(str(entry["device_id"])),
                    name=str(entry["name"]),
                    kind=str(entry["kind"]),
                    added_at=float(entry["added_at"]),
                )
                for entry in document["members"]
            )
            return cls(
                version=int(document["version"]),
                household_id=HouseholdId(str(document["household_id"])),
                members=members,
                revoked=tuple(DeviceId(str(d)) for d in document["revoked"]),
            )
        except IdentityError:
            raise
        except (ValueError, TypeError, KeyError) as error:
            raise IdentityError(f"roster document is malformed: {error!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedRoster:
    """A roster document exactly as signed, with the CA's ECDSA signature over it."""

    document: bytes
    signature: bytes

    def to_bytes(self) -> bytes:
        """Return a JSON envelope for storage (``roster.json``)."""
        envelope = {
            "document": base64.b64encode(self.document).decode("ascii"),
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }
        return json.dumps(envelope, sort_keys=True, indent=1).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedRoster:
        """Parse an envelope made by `to_bytes`; raise `IdentityError` when it is malformed."""
        try:
            envelope: Any = json.loads(data)
            return cls(
                document=base64.b64decode(envelope["document"], validate=True),
                signature=base64.b64decode(envelope["signature"], validate=True),
            )
        except (ValueError, TypeError, KeyError, binascii.Error) as error:
            raise IdentityError(f"signed roster is malformed: {error!r}") from None


def sign_roster(roster: Roster, ca_key: ec.EllipticCurvePrivateKey) -> SignedRoster:
    """Sign ``roster`` with the household CA key (ECDSA with SHA-256)."""
    document = roster.to_json()
    return SignedRoster(
        document=document, signature=ca_key.sign(_SIGNATURE_CONTEXT + document, ec.ECDSA(hashes.SHA256()))
    )


def verify_roster(signed: SignedRoster, ca_cert: x509.Certificate) -> Roster:
    """Check ``signed`` against the household CA and return the roster it holds.

    Raises:
        IdentityError: "roster signature invalid", a malformed document, or a roster of another household.
    """
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise IdentityError("household CA certificate does not hold an EC key")
    try:
        public_key.verify(signed.signature, _SIGNATURE_CONTEXT + signed.document, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise IdentityError("roster signature invalid") from None
    roster = Roster.from_json(signed.document)
    if roster.household_id != household_id(ca_cert):
        raise IdentityError(f"roster belongs to another household ({roster.household_id})")
    return roster
