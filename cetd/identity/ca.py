"""The household certificate authority: its self-signed certificate and the device certificates it issues.

Every gRPC connection between members is mutual TLS against this CA. A device certificate names the device
by a DNS-safe server name derived from its device ID (so a client can pin the exact peer it meant to reach),
and carries both serverAuth and clientAuth because every daemon is both. The CA certificate never names the
household: it travels in every TLS handshake and in mDNS-adjacent traffic, while the household's name stays
on its members' disks.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta, timezone
from functools import lru_cache

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cetd.errors import IdentityError
from cetd.identity.keys import device_id_from_public_key, generate_private_key, public_key_der
from cetd.ids import DeviceId, HouseholdId

CA_VALIDITY = timedelta(days=3652)
"""Lifetime of a household CA certificate (ten years)."""
DEVICE_CERT_VALIDITY = timedelta(days=1826)
"""Default lifetime of a device certificate (five years)."""
CLOCK_SKEW = timedelta(minutes=5)
"""Certificates start this long before their issuing so that a peer whose clock lags still accepts them."""
SERVER_NAME_SUFFIX = ".cetd"
"""Pseudo top-level domain of device server names; never resolved, only matched in TLS."""
MAX_NAME_LENGTH = 64
"""Longest device name: the X.509 upper bound of a common name."""

_HOUSEHOLD_ID_CONTEXT = b"cetd-household-v1"
_HOUSEHOLD_ID_BYTES = 16


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def check_device_name(name: str) -> str:
    """Return ``name`` when it is usable as a device name (1-64 printable characters), else raise
    `IdentityError`."""
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable() or name != name.strip():
        raise IdentityError(
            f"device name {name!r} is not valid: use 1 to {MAX_NAME_LENGTH} printable characters "
            "without leading or trailing spaces"
        )
    return name


def create_household_ca(*, now: datetime | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a new household CA: a fresh P-256 key and a ten-year self-signed CA certificate.

    The subject is ``cetd household CA <8 random hex digits>``; it never contains the household's name.
    """
    start = (now or _utcnow()) - CLOCK_SKEW
    key = generate_private_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cetd household CA {secrets.token_hex(4)}")])
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def certificate_pem(certificate: x509.Certificate) -> bytes:
    """Return ``certificate`` as PEM."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def load_certificate(pem: bytes, *, what: str = "certificate") -> x509.Certificate:
    """Parse the first PEM certificate in ``pem``; raise `IdentityError` naming ``what`` if it is corrupt."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise IdentityError(f"{what} is not a valid PEM certificate") from None


def ca_fingerprint(ca_cert: x509.Certificate) -> bytes:
    """Return the SHA-256 of the CA certificate's DER (32 bytes); join tokens pin the household with it."""
    return hashlib.sha256(ca_cert.public_bytes(serialization.Encoding.DER)).digest()


def household_id(ca_cert: x509.Certificate) -> HouseholdId:
    """Return the household's public ID: 32 hex digits derived from its CA certificate, never its name."""
    digest = hashlib.sha256(_HOUSEHOLD_ID_CONTEXT + ca_cert.public_bytes(serialization.Encoding.DER)).digest()
    return HouseholdId(digest[:_HOUSEHOLD_ID_BYTES].hex())


def tls_server_name(device_id: DeviceId) -> str:
    """Return the DNS name in ``device_id``'s certificate, e.g. ``d-abcdefghijklmnopqrstuvwxyz234567.cetd``;
    a client sets it as the TLS server name to reach exactly that device."""
    return f"d-{device_id.replace('-', '').lower()}{SERVER_NAME_SUFFIX}"


def issue_device_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: CertificatePublicKeyTypes,
    *,
    name: str,
    not_valid_before: datetime | None = None,
    not_valid_after: datetime | None = None,
) -> x509.Certificate:
    """Issue the certificate of the device holding ``public_key``.

    Args:
        ca_key, ca_cert: the household CA.
        public_key: the device's public key (from its certificate request).
        name: the device's human name, stored as the subject's common name.
        not_valid_before: start of validity; defaults to now minus `CLOCK_SKEW`.
        not_valid_after: end of validity; defaults to five years after the start, never past the CA's own
            expiry. Tests pass a past time to make an expired certificate.

    Returns:
        A certificate with the device's server name as its only DNS name and both serverAuth and clientAuth.
    """
    check_device_name(name)
    start = not_valid_before or (_utcnow() - CLOCK_SKEW)
    end = not_valid_after or min(start + DEVICE_CERT_VALIDITY, ca_cert.not_valid_after_utc)
    device_id = device_id_from_public_key(public_key)
    ca_public_key = ca_cert.public_key()
    if not isinstance(ca_public_key, ec.EllipticCurvePublicKey):
        raise IdentityError("household CA certificate does not hold an EC key")
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(tls_server_name(device_id))]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public_key), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def device_id_from_certificate(cert: x509.Certificate) -> DeviceId:
    """Return the device ID of the key that ``cert`` certifies."""
    return device_id_from_public_key(cert.public_key())


def certificate_name(cert: x509.Certificate) -> str:
    """Return the common name of ``cert``'s subject (a device's name, or the CA's label)."""
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not values:
        return ""
    value = values[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def check_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate, *, now: datetime | None = None) -> None:
    """Raise `IdentityError` unless ``ca_cert`` signed ``cert`` and ``cert`` is valid at ``now``."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise IdentityError(
            f"the certificate of device {device_id_from_certificate(cert)} was not issued by this household's CA"
        ) from None
    moment = now or _utcnow()
    if moment > cert.not_valid_after_utc:
        raise IdentityError(
            f"the certificate of device {device_id_from_certificate(cert)} expired at "
            f"{cert.not_valid_after_utc.isoformat(timespec='seconds')}"
        )
    if moment < cert.not_valid_before_utc:
        raise IdentityError(
            f"the certificate of device {device_id_from_certificate(cert)} is not valid before "
            f"{cert.not_valid_before_utc.isoformat(timespec='seconds')} (is this machine's clock right?)"
        )


def same_public_key(a: CertificatePublicKeyTypes, b: CertificatePublicKeyTypes) -> bool:
    """Return whether ``a`` and ``b`` are the same public key."""
    return public_key_der(a) == public_key_der(b)


@lru_cache(maxsize=4096)
def peer_device_id_from_pem(pem: bytes) -> DeviceId:
    """Return the device ID of the peer certificate ``pem`` (as gRPC's auth context gives it).

    Cached because the transport calls it on every RPC and the same few peers call again and again.

    Raises:
        IdentityError: ``pem`` is not a certificate.
    """
    return device_id_from_certificate(load_certificate(pem, what="peer certificate"))
