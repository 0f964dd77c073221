"""Certificate signing requests: how a joining device asks the household CA for its certificate.

The request carries the device's public key and its name, signed with the device's private key, so the CA
knows the requester holds the key it wants certified. The device ID is computed here from that key, never
taken from anything the requester claims.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cetd.errors import IdentityError
from cetd.identity.ca import check_device_name
from cetd.identity.keys import device_id_from_public_key
from cetd.ids import DeviceId


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    """Return a PEM certificate request for ``key`` asking for the device name ``name``."""
    check_device_name(name)
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


def load_csr(pem: bytes) -> tuple[x509.CertificateSigningRequest, DeviceId]:
    """Parse and check a PEM certificate request; return it with the device ID of its key.

    Raises:
        IdentityError: ``malformed certificate request: ...`` when it does not parse, its signature does not
            verify, its key is not EC P-256, or it carries no valid device name.
    """
    try:
        request = x509.load_pem_x509_csr(pem)
    except ValueError:
        raise IdentityError("malformed certificate request: not a PEM certificate request") from None
    try:
        signature_valid = request.is_signature_valid
        public_key = request.public_key()
    except (ValueError, TypeError) as error:
        raise IdentityError(f"malformed certificate request: {error}") from None
    if not signature_valid:
        raise IdentityError("malformed certificate request: its signature does not verify")
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        raise IdentityError("malformed certificate request: the key is not EC P-256")
    try:
        check_device_name(requested_name(request))
    except IdentityError as error:
        raise IdentityError(f"malformed certificate request: {error}") from None
    return request, device_id_from_public_key(public_key)


def requested_name(request: x509.CertificateSigningRequest) -> str:
    """Return the device name the request asks for (its subject's common name), or ``""``."""
    values = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not values:
        return ""
    value = values[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def csr_der(pem: bytes) -> bytes:
    """Return the DER of a PEM certificate request: the bytes a join token's proof is computed over."""
    try:
        return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise IdentityError("malformed certificate request: not a PEM certificate request") from None
