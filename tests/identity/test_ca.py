"""Household CA and device certificates."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cetd.errors import IdentityError
from cetd.identity import (
    ca_fingerprint,
    certificate_pem,
    check_issued_by,
    device_id_from_certificate,
    device_id_from_public_key,
    generate_private_key,
    household_id,
    issue_device_certificate,
    peer_device_id_from_pem,
    tls_server_name,
)

CA = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


@pytest.mark.timeout(10)
def test_ca_certificate_is_a_ten_year_ca_without_household_name(household_ca: CA) -> None:
    _, cert = household_ca
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3650) <= lifetime <= timedelta(days=3653)
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(common_name, str)
    assert common_name.startswith("cetd household CA ")
    assert len(cert.subject) == 1  # nothing but the neutral common name
    assert cert.issuer == cert.subject


@pytest.mark.timeout(10)
def test_fingerprint_and_household_id_are_derived_from_the_der(household_ca: CA, other_household_ca: CA) -> None:
    _, cert = household_ca
    der = cert.public_bytes(serialization.Encoding.DER)
    assert ca_fingerprint(cert) == hashlib.sha256(der).digest()
    assert household_id(cert) == hashlib.sha256(b"cetd-household-v1" + der).hexdigest()[:32]
    assert household_id(cert) != household_id(other_household_ca[1])


@pytest.mark.timeout(10)
def test_device_certificate_names_the_device_and_serves_both_roles(household_ca: CA) -> None:
    ca_key, ca_cert = household_ca
    device_key = generate_private_key()
    cert = issue_device_certificate(ca_key, ca_cert, device_key.public_key(), name="kitchen laptop")
    device_id = device_id_from_public_key(device_key.public_key())
    assert device_id_from_certificate(cert) == device_id
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [tls_server_name(device_id)]
    assert tls_server_name(device_id) == "d-" + device_id.replace("-", "").lower() + ".cetd"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=1825) <= lifetime <= timedelta(days=1827)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kitchen laptop"
    check_issued_by(cert, ca_cert)


@pytest.mark.timeout(10)
def test_expired_certificate_can_be_issued_and_is_refused(household_ca: CA) -> None:
    ca_key, ca_cert = household_ca
    past = datetime.now(timezone.utc) - timedelta(days=10)
    cert = issue_device_certificate(
        ca_key,
        ca_cert,
        generate_private_key().public_key(),
        name="old",
        not_valid_before=past,
        not_valid_after=past + timedelta(days=1),
    )
    assert cert.not_valid_after_utc < datetime.now(timezone.utc)
    with pytest.raises(IdentityError, match="expired at"):
        check_issued_by(cert, ca_cert)


@pytest.mark.timeout(10)
def test_certificate_from_another_household_is_refused(household_ca: CA, other_household_ca: CA) -> None:
    other_key, other_cert = other_household_ca
    cert = issue_device_certificate(other_key, other_cert, generate_private_key().public_key(), name="x")
    with pytest.raises(IdentityError, match="not issued by this household's CA"):
        check_issued_by(cert, household_ca[1])


@pytest.mark.timeout(10)
def test_peer_device_id_from_pem_is_cached_and_rejects_garbage(household_ca: CA) -> None:
    ca_key, ca_cert = household_ca
    key = generate_private_key()
    pem = certificate_pem(issue_device_certificate(ca_key, ca_cert, key.public_key(), name="peer"))
    peer_device_id_from_pem.cache_clear()
    for _ in range(5):
        assert peer_device_id_from_pem(pem) == device_id_from_public_key(key.public_key())
    info = peer_device_id_from_pem.cache_info()
    assert (info.misses, info.hits) == (1, 4)
    with pytest.raises(IdentityError, match="peer certificate is not a valid PEM certificate"):
        peer_device_id_from_pem(b"not a certificate")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", ["", " padded", "x" * 65, "tab\there"])
def test_invalid_device_names_are_refused(household_ca: CA, name: str) -> None:
    ca_key, ca_cert = household_ca
    with pytest.raises(IdentityError, match="is not valid"):
        issue_device_certificate(ca_key, ca_cert, generate_private_key().public_key(), name=name)
