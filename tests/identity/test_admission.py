"""The CA holder's membership changes: admission by token, by approval, and revocation."""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path

import pytest

from cetd.errors import IdentityError, TokenError
from cetd.identity import (
    PendingRequests,
    StateDir,
    admit_device,
    admit_with_token,
    ca_fingerprint,
    csr_der,
    device_id_from_public_key,
    generate_private_key,
    init_household,
    load_csr,
    load_identity,
    load_or_create_device_key,
    load_roster,
    make_csr,
    recertify_member,
    revoke_device,
    store_enrollment,
    token_proof,
    verification_code,
)
from cetd.identity.state import Identity

NOW = 1_900_000_000.0


@pytest.fixture
def owner(tmp_path: Path) -> tuple[StateDir, Identity]:
    state = StateDir(tmp_path / "owner")
    return state, init_household(state, "owner")


@pytest.mark.timeout(30)
def test_token_admission_adds_member_and_certificate_enrolls(owner: tuple[StateDir, Identity], tmp_path: Path) -> None:
    state, identity = owner
    token = state.token_store().issue(timedelta(minutes=10), NOW)
    joiner = StateDir(tmp_path / "joiner")
    key = load_or_create_device_key(joiner)
    request = make_csr(key, "attic nas")
    admission = admit_with_token(
        state, token.token_id, token_proof(token.secret, csr_der(request)), request, now=NOW + 1
    )
    assert admission.device_id == device_id_from_public_key(key.public_key())
    roster = load_roster(state)
    assert roster.version == 2
    assert roster.is_member(admission.device_id)
    member = roster.member(admission.device_id)
    assert member is not None
    assert (member.name, member.added_at) == ("attic nas", NOW + 1)
    joined = store_enrollment(joiner, admission.certificate_pem, admission.ca_pem, admission.signed_roster, "attic nas")
    assert joined.household_id == identity.household_id
    with pytest.raises(TokenError, match="already used"):
        admit_with_token(state, token.token_id, token_proof(token.secret, csr_der(request)), request, now=NOW + 2)
    assert load_roster(state).version == 2  # a refused attempt changes nothing


@pytest.mark.timeout(30)
def test_bad_token_admits_nobody(owner: tuple[StateDir, Identity]) -> None:
    state, _ = owner
    token = state.token_store().issue(timedelta(minutes=10), NOW)
    request = make_csr(generate_private_key(), "x")
    with pytest.raises(TokenError, match="proof does not match"):
        admit_with_token(state, token.token_id, b"\0" * 32, request, now=NOW)
    with pytest.raises(TokenError, match="expired"):
        admit_with_token(state, token.token_id, token_proof(token.secret, csr_der(request)), request, now=NOW + 601)
    assert load_roster(state).version == 1


@pytest.mark.timeout(30)
def test_owner_approval_flow(owner: tuple[StateDir, Identity]) -> None:
    state, identity = owner
    pending = PendingRequests(state)
    key = generate_private_key()
    request = make_csr(key, "tablet")
    first = pending.add(request, "10.77.0.3:7070", now=NOW)
    again = pending.add(request, "10.77.0.3:7070", now=NOW + 30)
    assert (again.first_seen, again.last_seen) == (NOW, NOW + 30)
    assert first.verification_code == verification_code(ca_fingerprint(identity.ca_certificate), key.public_key())
    assert stat.S_IMODE(state.pending.stat().st_mode) == 0o600
    assert [r.device_id for r in pending.waiting(NOW + 60)] == [first.device_id]

    admission = pending.approve(first.device_id, name="kids tablet", kind="client", now=NOW + 60)
    assert pending.waiting(NOW + 61) == ()
    member = load_roster(state).member(admission.device_id)
    assert member is not None
    assert (member.name, member.kind) == ("kids tablet", "client")
    with pytest.raises(IdentityError, match="already a member"):
        pending.add(request, "10.77.0.3:7070", now=NOW + 62)
    with pytest.raises(IdentityError, match="no join request"):
        pending.approve(first.device_id, now=NOW + 63)
    # A member polling with its request gets a certificate again, without a roster change.
    again_admission = recertify_member(state, request)
    assert again_admission.device_id == admission.device_id
    assert load_roster(state).version == 2


@pytest.mark.timeout(30)
def test_pending_requests_expire_are_bounded_and_can_be_rejected(owner: tuple[StateDir, Identity]) -> None:
    state, _ = owner
    pending = PendingRequests(state, ttl=timedelta(hours=1), limit=3)
    requests = [make_csr(generate_private_key(), f"d{i}") for i in range(4)]
    ids = [pending.add(r, "127.0.0.1:1", now=NOW + i).device_id for i, r in enumerate(requests)]
    assert [r.device_id for r in pending.waiting(NOW + 10)] == ids[1:]  # oldest dropped
    assert pending.reject(ids[1], now=NOW + 10) is True
    assert pending.reject(ids[1], now=NOW + 10) is False
    assert pending.waiting(NOW + 3 + 3601) == ()


@pytest.mark.timeout(30)
def test_revocation_is_signed_and_final(owner: tuple[StateDir, Identity]) -> None:
    state, identity = owner
    request = make_csr(generate_private_key(), "old phone")
    admission = admit_device(state, request, now=NOW)
    signed = revoke_device(state, admission.device_id)
    roster = load_roster(state)
    assert roster.version == 3
    assert not roster.is_member(admission.device_id)
    assert signed.document == roster.to_json()
    with pytest.raises(IdentityError, match="already revoked"):
        revoke_device(state, admission.device_id)
    with pytest.raises(IdentityError, match="was revoked"):
        admit_device(state, request, now=NOW)
    with pytest.raises(IdentityError, match="was revoked"):
        recertify_member(state, request)
    with pytest.raises(IdentityError, match="was revoked"):
        PendingRequests(state).add(request, "127.0.0.1:1")
    with pytest.raises(IdentityError, match="cannot revoke itself"):
        revoke_device(state, identity.device_id)
    stranger = load_csr(make_csr(generate_private_key(), "s"))[1]
    with pytest.raises(IdentityError, match="not a member"):
        revoke_device(state, stranger)


@pytest.mark.timeout(30)
def test_only_the_ca_holder_admits(owner: tuple[StateDir, Identity], tmp_path: Path) -> None:
    state, _ = owner
    joiner = StateDir(tmp_path / "joiner")
    request = make_csr(load_or_create_device_key(joiner), "j")
    admission = admit_device(state, request, now=NOW)
    store_enrollment(joiner, admission.certificate_pem, admission.ca_pem, admission.signed_roster, "j")
    assert not load_identity(joiner).is_ca_holder
    with pytest.raises(IdentityError, match="does not hold the household CA"):
        admit_device(joiner, make_csr(generate_private_key(), "x"))
    with pytest.raises(IdentityError, match="only the device holding the household CA"):
        joiner.token_store()
