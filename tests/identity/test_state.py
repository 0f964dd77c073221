"""The state directory: creating a household, loading it, joining, copy detection."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from cetd.errors import IdentityError
from cetd.identity import (
    Member,
    StateDir,
    certificate_pem,
    device_id_from_public_key,
    init_household,
    issue_device_certificate,
    load_ca_key,
    load_identity,
    load_or_create_device_key,
    load_roster,
    load_signed_roster,
    sign_roster,
    store_enrollment,
    store_roster,
    tls_server_name,
)
from cetd.identity.state import HouseholdRecord

MACHINE = "0123456789abcdef0123456789abcdef"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.timeout(20)
def test_init_creates_a_complete_private_identity(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    identity = init_household(state, "study desktop", household_name="The Smiths", machine_id=MACHINE)
    assert _mode(state.path) == 0o700
    assert _mode(state.ca_key) == 0o600
    assert _mode(state.device_key) == 0o600
    assert identity.is_ca_holder
    assert identity.name == "study desktop"
    assert identity.device_id == device_id_from_public_key(identity.key.public_key())
    roster = load_roster(state)
    assert roster.version == 1
    assert roster.household_id == identity.household_id
    assert [m.device_id for m in roster.members] == [identity.device_id]
    # The household's name stays on this disk; the CA certificate does not carry it.
    assert b"Smiths" not in identity.ca_pem
    assert b"Smiths" in state.household.read_bytes()
    chain = identity.cert_chain_pem
    assert chain == certificate_pem(identity.certificate) + identity.ca_pem
    assert identity.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert load_ca_key(state).public_key().public_numbers() == (
        identity.ca_certificate.public_key().public_numbers()  # type: ignore[union-attr]  # EC key known here
    )


@pytest.mark.timeout(20)
def test_identity_is_stable_across_reloads(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    created = init_household(state, "a", machine_id=MACHINE)
    for _ in range(3):
        loaded = load_identity(state, machine_id=MACHINE)
        assert loaded.device_id == created.device_id
        assert loaded.household_id == created.household_id
        assert loaded.certificate == created.certificate


@pytest.mark.timeout(20)
def test_init_twice_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    init_household(state, "a", machine_id=MACHINE)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(IdentityError, match="already holds a cetd identity"):
        init_household(state, "b", machine_id=MACHINE)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.timeout(20)
def test_missing_and_corrupt_state_are_explained(tmp_path: Path) -> None:
    empty = StateDir(tmp_path / "empty")
    with pytest.raises(IdentityError, match=r"no cetd identity .* run `cetd init`"):
        load_identity(empty)
    state = StateDir(tmp_path / "s")
    init_household(state, "a", machine_id=MACHINE)
    state.device_cert.write_bytes(b"garbage")
    with pytest.raises(IdentityError, match=r"device certificate .* is not a valid PEM certificate"):
        load_identity(state, machine_id=MACHINE)
    state.household.write_bytes(b"{}")
    with pytest.raises(IdentityError, match=r"household\.json is corrupt"):
        load_identity(state, machine_id=MACHINE)


@pytest.mark.timeout(20)
def test_readable_private_key_is_refused_by_load_identity(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    init_household(state, "a", machine_id=MACHINE)
    state.device_key.chmod(0o644)
    with pytest.raises(IdentityError, match=r"device.key has mode 0644 but must be 0600"):
        load_identity(state, machine_id=MACHINE)
    state.device_key.chmod(0o600)
    state.ca_key.chmod(0o604)
    with pytest.raises(IdentityError, match=r"ca.key has mode 0604"):
        load_identity(state, machine_id=MACHINE)


@pytest.mark.timeout(20)
def test_copied_state_dir_is_detected(tmp_path: Path) -> None:
    original = StateDir(tmp_path / "original")
    identity = init_household(original, "a", machine_id=MACHINE)
    copy = StateDir(tmp_path / "copy")
    shutil.copytree(original.path, copy.path)
    with pytest.raises(IdentityError, match=f"was copied .* impersonate device {identity.device_id}"):
        load_identity(copy, machine_id=MACHINE)
    # Same path, another machine: also a copy.
    with pytest.raises(IdentityError, match="run `cetd join` to make this a new device"):
        load_identity(original, machine_id="another machine")
    assert load_identity(original, machine_id=MACHINE).device_id == identity.device_id


@pytest.mark.timeout(20)
def test_binding_defaults_to_this_machine(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    identity = init_household(state, "a")
    assert load_identity(state).device_id == identity.device_id


@pytest.mark.timeout(30)
def test_joining_device_enrolls_and_loads(tmp_path: Path) -> None:
    owner_state = StateDir(tmp_path / "owner")
    owner = init_household(owner_state, "owner", machine_id=MACHINE)
    joiner_state = StateDir(tmp_path / "joiner")
    key = load_or_create_device_key(joiner_state, machine_id=MACHINE)
    assert _mode(joiner_state.device_key) == 0o600
    assert load_or_create_device_key(joiner_state, machine_id=MACHINE).private_numbers() == key.private_numbers()
    with pytest.raises(IdentityError, match="has not joined a household yet"):
        load_identity(joiner_state, machine_id=MACHINE)

    # The CA holder's side of the enrollment.
    ca_key = load_ca_key(owner_state)
    cert = issue_device_certificate(ca_key, owner.ca_certificate, key.public_key(), name="joiner")
    joiner_id = device_id_from_public_key(key.public_key())
    roster = load_roster(owner_state).with_member(Member(device_id=joiner_id, name="joiner", added_at=5.0))
    signed = sign_roster(roster, ca_key)
    assert store_roster(owner_state, signed) is True

    identity = store_enrollment(joiner_state, certificate_pem(cert), owner.ca_pem, signed, "joiner", machine_id=MACHINE)
    assert identity.device_id == joiner_id
    assert not identity.is_ca_holder
    assert identity.household_id == owner.household_id
    assert load_identity(joiner_state, machine_id=MACHINE).device_id == joiner_id
    assert load_roster(joiner_state).version == 2
    with pytest.raises(IdentityError, match="does not hold the household CA"):
        load_ca_key(joiner_state)
    with pytest.raises(IdentityError, match="already member"):
        load_or_create_device_key(joiner_state, machine_id=MACHINE)
    assert tls_server_name(joiner_id).startswith("d-")


@pytest.mark.timeout(30)
def test_enrollment_refuses_foreign_certificates_and_rosters(tmp_path: Path) -> None:
    owner_state = StateDir(tmp_path / "owner")
    owner = init_household(owner_state, "owner", machine_id=MACHINE)
    joiner_state = StateDir(tmp_path / "joiner")
    key = load_or_create_device_key(joiner_state, machine_id=MACHINE)
    ca_key = load_ca_key(owner_state)
    joiner_id = device_id_from_public_key(key.public_key())

    someone_else = load_or_create_device_key(StateDir(tmp_path / "else"), machine_id=MACHINE)
    wrong_cert = issue_device_certificate(ca_key, owner.ca_certificate, someone_else.public_key(), name="x")
    roster = load_roster(owner_state).with_member(Member(device_id=joiner_id, name="j", added_at=0))
    signed = sign_roster(roster, ca_key)
    with pytest.raises(IdentityError, match="for another key"):
        store_enrollment(joiner_state, certificate_pem(wrong_cert), owner.ca_pem, signed, "j", machine_id=MACHINE)

    cert = issue_device_certificate(ca_key, owner.ca_certificate, key.public_key(), name="j")
    unlisted = load_signed_roster(owner_state)  # version 1: only the owner
    with pytest.raises(IdentityError, match=f"does not list device {joiner_id}"):
        store_enrollment(joiner_state, certificate_pem(cert), owner.ca_pem, unlisted, "j", machine_id=MACHINE)
    assert not joiner_state.household.exists()


@pytest.mark.timeout(20)
def test_store_roster_keeps_the_newest(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    identity = init_household(state, "a", machine_id=MACHINE)
    ca_key = load_ca_key(state)
    v1 = load_roster(state)
    v2 = v1.with_revoked(device_id_from_public_key(load_or_create_device_key(StateDir(tmp_path / "x")).public_key()))
    assert store_roster(state, sign_roster(v2, ca_key)) is True
    assert store_roster(state, sign_roster(v1, ca_key)) is False
    assert load_roster(state).version == 2
    assert load_roster(state).is_member(identity.device_id)


@pytest.mark.timeout(30)
def test_copied_dir_joins_as_a_new_device(tmp_path: Path) -> None:
    original = StateDir(tmp_path / "original")
    identity = init_household(original, "a", machine_id=MACHINE)
    copy = StateDir(tmp_path / "copy")
    shutil.copytree(original.path, copy.path)
    key = load_or_create_device_key(copy, machine_id=MACHINE)
    assert device_id_from_public_key(key.public_key()) != identity.device_id
    aside = [p for p in copy.path.iterdir() if p.name.startswith("copied-")]
    assert len(aside) == 1
    assert (aside[0] / "ca.key").exists()
    assert not copy.ca_key.exists()
    assert not copy.household.exists()
    original_key = original.device_key.read_bytes()
    assert (aside[0] / "device.key").read_bytes() == original_key
    assert (
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        != original_key
    )


@pytest.mark.timeout(10)
def test_household_record_round_trips(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    identity = init_household(state, "a", household_name="Home", machine_id=MACHINE, now=1234.5)
    record = HouseholdRecord.read(state.household)
    assert record.created == 1234.5
    assert record.household_name == "Home"
    assert record.device_id == identity.device_id
    assert len(record.binding) == 64
