"""Test identities for the transport tests: a household CA with device certificates, and a stranger CA.

Built with `cetd.identity` (EC P-256 CA, device certificates whose only DNS name is
``tls_server_name(device_id)``), once per test session because key generation is not free.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cetd.identity.ca import certificate_pem, create_household_ca, issue_device_certificate, tls_server_name
from cetd.identity.keys import device_id_from_public_key, generate_private_key, private_key_pem
from cetd.transport.credentials import TlsMaterial


@dataclass(frozen=True, slots=True, kw_only=True)
class TestDevice:
    """One device's TLS material and the name a peer dials it by."""

    __test__ = False  # not a test class, despite the name

    tls: TlsMaterial
    tls_name: str
    cert_pem: bytes


def make_household(names: list[str]) -> list[TestDevice]:
    """A fresh household CA and one device certificate per name."""
    ca_key, ca_cert = create_household_ca()
    ca_pem = certificate_pem(ca_cert)
    devices = []
    for name in names:
        key = generate_private_key()
        cert = issue_device_certificate(ca_key, ca_cert, key.public_key(), name=name)
        cert_pem = certificate_pem(cert)
        devices.append(
            TestDevice(
                tls=TlsMaterial(key_pem=private_key_pem(key), cert_chain_pem=cert_pem + ca_pem, ca_pem=ca_pem),
                tls_name=tls_server_name(device_id_from_public_key(key.public_key())),
                cert_pem=cert_pem,
            )
        )
    return devices


@pytest.fixture(scope="session")
def household() -> list[TestDevice]:
    """Three members of one household."""
    return make_household(["alpha", "beta", "gamma"])


@pytest.fixture(scope="session")
def stranger() -> TestDevice:
    """A device of another household (another CA)."""
    return make_household(["mallory"])[0]
