"""The state directory: a device's keys, certificates, roster and household record on disk.

Layout (directory mode 0700; secrets mode 0600, every file replaced atomically):

``ca.key``          household CA private key (only on the CA holder)
``ca.pem``          household CA certificate
``device.key``      this device's private key
``device.pem``      this device's certificate, issued by the CA
``roster.json``     the newest signed roster this device has seen
``household.json``  device and household names, household and device IDs, creation time, machine binding
``tokens.json``     join tokens issued by this CA holder
``pending.json``    devices waiting for the owner's approval (CA holder only)

The machine binding in ``household.json`` detects a state directory copied to another machine or path: the
copy would hold the same private key and so impersonate the original device, which breaks every guarantee
that rests on device IDs being unique.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from cetd.errors import IdentityError
from cetd.identity.ca import (
    CLOCK_SKEW,
    ca_fingerprint,
    certificate_pem,
    check_device_name,
    check_issued_by,
    create_household_ca,
    device_id_from_certificate,
    household_id,
    issue_device_certificate,
    load_certificate,
    same_public_key,
)
from cetd.identity.keys import (
    device_id_from_public_key,
    generate_private_key,
    private_key_pem,
    write_file_atomic,
    write_private_key,
)
from cetd.identity.keys import load_private_key as _load_key
from cetd.identity.roster import Member, Roster, SignedRoster, sign_roster, verify_roster
from cetd.identity.tokens import TokenStore
from cetd.ids import DeviceId, HouseholdId

STATE_DIR_MODE = 0o700
PUBLIC_FILE_MODE = 0o644
_HOUSEHOLD_FORMAT = 1
_MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
# Roster updates arrive from several RPC handlers at once; the compare-then-write must not interleave.
_ROSTER_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class StateDir:
    """Paths of one device's state directory; `ensure` creates it with mode 0700."""

    path: Path

    def __init__(self, path: Path | str) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def ca_key(self) -> Path:
        return self.path / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.path / "ca.pem"

    @property
    def device_key(self) -> Path:
        return self.path / "device.key"

    @property
    def device_cert(self) -> Path:
        return self.path / "device.pem"

    @property
    def roster(self) -> Path:
        return self.path / "roster.json"

    @property
    def household(self) -> Path:
        return self.path / "household.json"

    @property
    def tokens(self) -> Path:
        return self.path / "tokens.json"

    @property
    def pending(self) -> Path:
        return self.path / "pending.json"

    def ensure(self) -> None:
        """Create the directory if it does not exist yet, and make it 0700 either way.

        An existing directory (made by hand, or by an installer's default umask) is tightened too:
        it holds private keys and join secrets.
        """
        self.path.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        if self.path.stat().st_mode & 0o777 != STATE_DIR_MODE:
            self.path.chmod(STATE_DIR_MODE)

    def identity_files(self) -> tuple[Path, ...]:
        """Return the identity files present (keys, certificates, household record)."""
        candidates = (self.ca_key, self.ca_cert, self.device_key, self.device_cert, self.household)
        return tuple(p for p in candidates if p.exists())

    def token_store(self) -> TokenStore:
        """Return the join-token store of this CA holder.

        Raises:
            IdentityError: this device does not hold the household CA.
        """
        if not self.ca_key.exists():
            raise IdentityError(f"only the device holding the household CA can issue join tokens ({self.path})")
        return TokenStore(self.tokens, ca_fingerprint=ca_fingerprint(_read_certificate(self.ca_cert, "CA")))


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Who this device is: its key and certificate, and the household CA it belongs to."""

    device_id: DeviceId
    name: str
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    ca_certificate: x509.Certificate
    household_id: HouseholdId
    is_ca_holder: bool
    """Whether ``ca.key`` is here: this device admits and revokes members and signs rosters."""

    @property
    def key_pem(self) -> bytes:
        """The device's private key as PEM (for gRPC credentials)."""
        return private_key_pem(self.key)

    @property
    def cert_chain_pem(self) -> bytes:
        """The device certificate followed by the CA certificate, as servers present them."""
        return certificate_pem(self.certificate) + certificate_pem(self.ca_certificate)

    @property
    def ca_pem(self) -> bytes:
        """The household CA certificate as PEM: the only root a member trusts."""
        return certificate_pem(self.ca_certificate)

    @property
    def ca_fingerprint(self) -> bytes:
        """SHA-256 of the CA certificate's DER."""
        return ca_fingerprint(self.ca_certificate)


def read_machine_id() -> str:
    """Return this machine's identity: ``/etc/machine-id``, else D-Bus's copy, else the host name."""
    for path in _MACHINE_ID_FILES:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if value:
            return value
    return socket.gethostname()


def machine_binding(state_path: Path, machine_id: str | None = None) -> str:
    """Return the hex SHA-256 of the machine ID and the state directory's real path."""
    machine = read_machine_id() if machine_id is None else machine_id
    return hashlib.sha256(f"{machine}\0{os.path.realpath(state_path)}".encode()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class HouseholdRecord:
    """Content of ``household.json``."""

    device_name: str
    household_name: str | None
    """Known on the device that created the household; joined devices may not know it."""
    household_id: HouseholdId
    device_id: DeviceId
    created: float
    binding: str

    def to_json(self) -> bytes:
        document = {
            "format": _HOUSEHOLD_FORMAT,
            "device_name": self.device_name,
            "household_name": self.household_name,
            "household_id": self.household_id,
            "device_id": self.device_id,
            "created": self.created,
            "binding": self.binding,
        }
        return json.dumps(document, sort_keys=True, indent=1).encode("utf-8")

    @classmethod
    def read(cls, path: Path) -> HouseholdRecord:
        try:
            document: Any = json.loads(path.read_bytes())
            if document["format"] != _HOUSEHOLD_FORMAT:
                raise IdentityError(f"{path} has unsupported format {document['format']}")
            return cls(
                device_name=str(document["device_name"]),
                household_name=document["household_name"],
                household_id=HouseholdId(str(document["household_id"])),
                device_id=DeviceId(str(document["device_id"])),
                created=float(document["created"]),
                binding=str(document["binding"]),
            )
        except IdentityError:
            raise
        except OSError as error:
            raise IdentityError(f"cannot read {path}: {error.strerror}") from None
        except (ValueError, TypeError, KeyError) as error:
            raise IdentityError(f"{path} is corrupt: {error!r}") from None


def _read_certificate(path: Path, what: str) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{what} certificate {path} is missing") from None
    except OSError as error:
        raise IdentityError(f"cannot read {what} certificate {path}: {error.strerror}") from None
    return load_certificate(data, what=f"{what} certificate {path}")


def _now_utc(now: float | None) -> tuple[float, datetime]:
    epoch = time.time() if now is None else now
    return epoch, datetime.fromtimestamp(epoch, timezone.utc)


def init_household(
    state_dir: StateDir,
    name: str,
    *,
    household_name: str | None = None,
    machine_id: str | None = None,
    now: float | None = None,
) -> Identity:
    """Create a household in ``state_dir``: its CA, this device's key and certificate, and roster v1 with
    this device as the only member.

    Args:
        state_dir: an empty or missing state directory.
        name: this device's name.
        household_name: the household's name, kept on this disk only.
        machine_id: overrides the machine ID of the copy detection (tests).
        now: creation time in epoch seconds (tests).

    Raises:
        IdentityError: the directory already holds an identity (never overwritten), or ``name`` is invalid.
    """
    check_device_name(name)
    state_dir.ensure()
    existing = state_dir.identity_files()
    if existing:
        raise IdentityError(
            f"{state_dir.path} already holds a cetd identity ({', '.join(p.name for p in existing)}); "
            "refusing to overwrite it"
        )
    epoch, moment = _now_utc(now)
    ca_key, ca_cert = create_household_ca(now=moment)
    device_key = generate_private_key()
    certificate = issue_device_certificate(
        ca_key, ca_cert, device_key.public_key(), name=name, not_valid_before=moment - CLOCK_SKEW
    )
    device_id = device_id_from_public_key(device_key.public_key())
    household = household_id(ca_cert)
    roster = Roster(
        version=1,
        household_id=household,
        members=(Member(device_id=device_id, name=name, kind="device", added_at=epoch),),
    )
    write_private_key(state_dir.ca_key, ca_key)
    write_file_atomic(state_dir.ca_cert, certificate_pem(ca_cert), PUBLIC_FILE_MODE)
    write_private_key(state_dir.device_key, device_key)
    write_file_atomic(state_dir.device_cert, certificate_pem(certificate), PUBLIC_FILE_MODE)
    write_file_atomic(state_dir.roster, sign_roster(roster, ca_key).to_bytes(), PUBLIC_FILE_MODE)
    record = HouseholdRecord(
        device_name=name,
        household_name=household_name,
        household_id=household,
        device_id=device_id,
        created=epoch,
        binding=machine_binding(state_dir.path, machine_id),
    )
    # Written last: its presence marks a complete identity.
    write_file_atomic(state_dir.household, record.to_json(), PUBLIC_FILE_MODE)
    return load_identity(state_dir, machine_id=machine_id, now=now)


def _check_binding(state_dir: StateDir, record: HouseholdRecord, machine_id: str | None) -> None:
    if record.binding != machine_binding(state_dir.path, machine_id):
        raise IdentityError(
            f"state directory {state_dir.path} was copied from another machine or path; a copy would "
            f"impersonate device {record.device_id} — run `cetd join` to make this a new device"
        )


def load_household_record(state_dir: StateDir) -> HouseholdRecord:
    """Read ``household.json``; raise `IdentityError` saying what to do when this device has no identity."""
    if not state_dir.household.exists():
        if state_dir.device_key.exists():
            raise IdentityError(
                f"{state_dir.path} holds a device key but this device has not joined a household yet; "
                "run `cetd join TOKEN` or wait for the owner's approval"
            )
        raise IdentityError(
            f"no cetd identity in {state_dir.path}; run `cetd init` to create a household "
            "or `cetd join TOKEN` to join one"
        )
    return HouseholdRecord.read(state_dir.household)


def load_identity(state_dir: StateDir, *, machine_id: str | None = None, now: float | None = None) -> Identity:
    """Load and cross-check this device's identity.

    Raises:
        IdentityError: files are missing or corrupt, a private key is readable by others, the certificate does
            not match the key or the CA, it expired, or the directory was copied from elsewhere.
    """
    record = load_household_record(state_dir)
    _check_binding(state_dir, record, machine_id)
    key = _load_key(state_dir.device_key)
    certificate = _read_certificate(state_dir.device_cert, "device")
    ca_cert = _read_certificate(state_dir.ca_cert, "CA")
    if not same_public_key(certificate.public_key(), key.public_key()):
        raise IdentityError(f"{state_dir.device_cert} does not certify the key in {state_dir.device_key}")
    check_issued_by(certificate, ca_cert, now=_now_utc(now)[1])
    if household_id(ca_cert) != record.household_id:
        raise IdentityError(f"{state_dir.ca_cert} is not the CA of household {record.household_id}")
    device_id = device_id_from_certificate(certificate)
    if device_id != record.device_id:
        raise IdentityError(f"{state_dir.household} names device {record.device_id}, but the key is {device_id}")
    is_ca_holder = state_dir.ca_key.exists()
    if is_ca_holder:
        ca_key = _load_key(state_dir.ca_key)
        if not same_public_key(ca_key.public_key(), ca_cert.public_key()):
            raise IdentityError(f"{state_dir.ca_key} is not the key of {state_dir.ca_cert}")
    return Identity(
        device_id=device_id,
        name=record.device_name,
        key=key,
        certificate=certificate,
        ca_certificate=ca_cert,
        household_id=record.household_id,
        is_ca_holder=is_ca_holder,
    )


def load_ca_key(state_dir: StateDir) -> ec.EllipticCurvePrivateKey:
    """Load the household CA key. Kept out of `Identity` so that it never reaches worker processes.

    Raises:
        IdentityError: this device does not hold the CA, or the key file is unsafe or corrupt.
    """
    if not state_dir.ca_key.exists():
        raise IdentityError(f"this device does not hold the household CA ({state_dir.ca_key} is absent)")
    return _load_key(state_dir.ca_key)


def _set_aside_copied_identity(state_dir: StateDir) -> None:
    """Move a copied identity into ``copied-<time>/`` (never delete keys) so the device can start afresh."""
    aside = state_dir.path / f"copied-{int(time.time())}"
    aside.mkdir(mode=STATE_DIR_MODE)
    for path in (
        state_dir.ca_key,
        state_dir.ca_cert,
        state_dir.device_key,
        state_dir.device_cert,
        state_dir.roster,
        state_dir.household,
        state_dir.tokens,
        state_dir.pending,
    ):
        if path.exists():
            path.rename(aside / path.name)


def load_or_create_device_key(state_dir: StateDir, *, machine_id: str | None = None) -> ec.EllipticCurvePrivateKey:
    """Return the key of a device that is about to join, creating it (mode 0600) on first use.

    A state directory copied from another device is set aside in ``copied-<time>/`` and a new key is made, so
    the copy becomes a new device instead of a twin of the original.

    Raises:
        IdentityError: this directory already holds a device that is a member of a household.
    """
    state_dir.ensure()
    if state_dir.household.exists():
        record = HouseholdRecord.read(state_dir.household)
        if record.binding == machine_binding(state_dir.path, machine_id):
            raise IdentityError(
                f"this device is already member {record.device_id} of household {record.household_id} "
                f"({state_dir.path})"
            )
        _set_aside_copied_identity(state_dir)
    if state_dir.device_key.exists():
        return _load_key(state_dir.device_key)
    key = generate_private_key()
    write_private_key(state_dir.device_key, key)
    return key


def store_enrollment(
    state_dir: StateDir,
    cert_pem: bytes,
    ca_pem: bytes,
    signed_roster: SignedRoster,
    name: str,
    *,
    machine_id: str | None = None,
    now: float | None = None,
) -> Identity:
    """Record the certificate a joining device received, making it a member; return its identity.

    Args:
        cert_pem: the device certificate (a chain is accepted; the first certificate is used).
        ca_pem: the household CA certificate, already pinned by the caller (join token fingerprint or the
            owner's verification code).
        signed_roster: a roster that lists this device.
        name: this device's name.

    Raises:
        IdentityError: no device key yet, the certificate is not for this key or not from this CA, or the
            roster is invalid or does not list this device.
    """
    check_device_name(name)
    key = _load_key(state_dir.device_key)
    certificate = load_certificate(cert_pem, what="issued device certificate")
    ca_cert = load_certificate(ca_pem, what="household CA certificate")
    epoch, moment = _now_utc(now)
    if not same_public_key(certificate.public_key(), key.public_key()):
        raise IdentityError("the issued certificate is for another key than this device's")
    check_issued_by(certificate, ca_cert, now=moment)
    device_id = device_id_from_public_key(key.public_key())
    roster = verify_roster(signed_roster, ca_cert)
    if not roster.is_member(device_id):
        raise IdentityError(f"the household's roster does not list device {device_id}")
    write_file_atomic(state_dir.ca_cert, certificate_pem(ca_cert), PUBLIC_FILE_MODE)
    write_file_atomic(state_dir.device_cert, certificate_pem(certificate), PUBLIC_FILE_MODE)
    write_file_atomic(state_dir.roster, signed_roster.to_bytes(), PUBLIC_FILE_MODE)
    record = HouseholdRecord(
        device_name=name,
        household_name=None,
        household_id=household_id(ca_cert),
        device_id=device_id,
        created=epoch,
        binding=machine_binding(state_dir.path, machine_id),
    )
    write_file_atomic(state_dir.household, record.to_json(), PUBLIC_FILE_MODE)
    return load_identity(state_dir, machine_id=machine_id, now=now)


def load_signed_roster(state_dir: StateDir) -> SignedRoster:
    """Read the stored signed roster (unverified; see `load_roster`)."""
    try:
        return SignedRoster.from_bytes(state_dir.roster.read_bytes())
    except FileNotFoundError:
        raise IdentityError(f"roster {state_dir.roster} is missing") from None


def load_roster(state_dir: StateDir) -> Roster:
    """Read the stored roster and verify it against the stored CA certificate."""
    return verify_roster(load_signed_roster(state_dir), _read_certificate(state_dir.ca_cert, "CA"))


def store_roster(state_dir: StateDir, signed: SignedRoster) -> bool:
    """Verify ``signed`` and store it if it is newer than the stored roster; return whether it was stored.

    Raises:
        IdentityError: the roster's signature or household is wrong.
    """
    roster = verify_roster(signed, _read_certificate(state_dir.ca_cert, "CA"))
    with _ROSTER_LOCK:
        if state_dir.roster.exists() and load_roster(state_dir).version >= roster.version:
            return False
        write_file_atomic(state_dir.roster, signed.to_bytes(), PUBLIC_FILE_MODE)
        return True
