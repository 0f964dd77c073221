"""Device keys, device IDs and atomic owner-only writes."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cetd.errors import IdentityError
from cetd.identity import (
    device_id_from_public_key,
    generate_private_key,
    load_private_key,
    parse_device_id,
    short_id,
    write_file_atomic,
    write_private_key,
)

DEVICE_ID = re.compile(r"^[A-Z2-7]{8}-[A-Z2-7]{8}-[A-Z2-7]{8}-[A-Z2-7]{8}$")


@pytest.mark.timeout(10)
def test_device_id_is_base32_of_first_20_bytes_of_spki_sha256() -> None:
    key = generate_private_key()
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    expected = base64.b32encode(hashlib.sha256(spki).digest()[:20]).decode()
    device_id = device_id_from_public_key(key.public_key())
    assert DEVICE_ID.match(device_id)
    assert device_id.replace("-", "") == expected
    assert len(device_id) == 35
    assert short_id(device_id) == expected[:8]


@pytest.mark.timeout(10)
def test_device_id_is_unique_per_key() -> None:
    ids = {device_id_from_public_key(generate_private_key().public_key()) for _ in range(50)}
    assert len(ids) == 50


@pytest.mark.timeout(10)
def test_private_key_round_trip_keeps_device_id_and_mode_0600(tmp_path: Path) -> None:
    key = generate_private_key()
    path = tmp_path / "device.key"
    write_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_private_key(path)
    assert isinstance(loaded.curve, ec.SECP256R1)
    assert device_id_from_public_key(loaded.public_key()) == device_id_from_public_key(key.public_key())
    # Only the final file remains: no temporary leftovers.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.key"]


@pytest.mark.timeout(10)
def test_key_file_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        write_private_key(tmp_path / "k", generate_private_key())
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


@pytest.mark.timeout(10)
def test_atomic_write_replaces_content_and_honours_mode(tmp_path: Path) -> None:
    path = tmp_path / "roster.json"
    write_file_atomic(path, b"first", 0o644)
    write_file_atomic(path, b"second", 0o644)
    assert path.read_bytes() == b"second"
    assert stat.S_IMODE(path.stat().st_mode) & 0o600 == 0o600
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.timeout(10)
def test_group_readable_key_is_refused_with_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    write_private_key(path, generate_private_key())
    path.chmod(0o640)
    with pytest.raises(IdentityError, match=r"mode 0640 but must be 0600"):
        load_private_key(path)
    assert load_private_key(path, check_mode=False) is not None


@pytest.mark.timeout(10)
def test_missing_corrupt_and_wrong_curve_keys_are_explained(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="is missing"):
        load_private_key(tmp_path / "absent.key")
    corrupt = tmp_path / "corrupt.key"
    write_file_atomic(corrupt, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(IdentityError, match="corrupt"):
        load_private_key(corrupt)
    p384 = ec.generate_private_key(ec.SECP384R1())
    other = tmp_path / "p384.key"
    write_file_atomic(
        other,
        p384.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    with pytest.raises(IdentityError, match="not an EC P-256 key"):
        load_private_key(other)


@pytest.mark.timeout(10)
def test_parse_device_id_normalizes_typed_ids() -> None:
    device_id = device_id_from_public_key(generate_private_key().public_key())
    typed = device_id.replace("-", " ").lower()
    assert parse_device_id(typed) == device_id
    assert parse_device_id(device_id.replace("-", "")) == device_id
    with pytest.raises(IdentityError, match="is not a device ID"):
        parse_device_id("ABCDEFGH-IJKLMNOP")
    with pytest.raises(IdentityError, match="is not a device ID"):
        parse_device_id("ABCDEFGH-IJKLMNOP-QRSTUVWX-YZ234561")  # '1' is not base32
