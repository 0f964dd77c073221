"""Certificate requests of joining devices."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cetd.errors import IdentityError
from cetd.identity import csr_der, device_id_from_public_key, generate_private_key, load_csr, make_csr
from cetd.identity.csr import requested_name


@pytest.mark.timeout(10)
def test_csr_round_trip_yields_the_key_device_id_and_name() -> None:
    key = generate_private_key()
    pem = make_csr(key, "garage pi")
    request, device_id = load_csr(pem)
    assert device_id == device_id_from_public_key(key.public_key())
    assert requested_name(request) == "garage pi"
    assert csr_der(pem) == request.public_bytes(serialization.Encoding.DER)


@pytest.mark.timeout(10)
def test_tampered_csr_signature_is_refused() -> None:
    der = bytearray(csr_der(make_csr(generate_private_key(), "pi")))
    der[-5] ^= 0x01  # inside the signature
    pem = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IdentityError, match="malformed certificate request: its signature does not verify"):
        load_csr(pem)


@pytest.mark.timeout(10)
def test_csr_with_swapped_public_key_is_refused() -> None:
    """Someone replaying a CSR with their own key in it cannot produce a valid signature."""
    victim = make_csr(generate_private_key(), "victim")
    victim_der = csr_der(victim)
    attacker = generate_private_key().public_key()
    victim_key_der = (
        x509.load_pem_x509_csr(victim)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    attacker_der = attacker.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    swapped = victim_der.replace(victim_key_der, attacker_der)
    assert swapped != victim_der
    pem = x509.load_der_x509_csr(swapped).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IdentityError, match="signature does not verify"):
        load_csr(pem)


@pytest.mark.timeout(10)
def test_garbage_and_wrong_curve_csrs_are_refused() -> None:
    with pytest.raises(IdentityError, match="malformed certificate request: not a PEM"):
        load_csr(b"hello")
    key = ec.generate_private_key(ec.SECP384R1())
    pem = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "big")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(IdentityError, match="not EC P-256"):
        load_csr(pem)


@pytest.mark.timeout(10)
def test_csr_without_a_name_is_refused() -> None:
    pem = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(generate_private_key(), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(IdentityError, match="malformed certificate request: device name"):
        load_csr(pem)
