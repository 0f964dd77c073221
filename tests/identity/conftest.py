"""Shared fixtures for the identity tests: one household CA per test module (key generation is cheap,
but reusing it keeps the tests about behaviour rather than setup)."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from cetd.identity import create_household_ca


@pytest.fixture(scope="module")
def household_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return create_household_ca()


@pytest.fixture(scope="module")
def other_household_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return create_household_ca()
