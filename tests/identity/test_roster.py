"""The signed household roster."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from cetd.errors import IdentityError
from cetd.identity import (
    Member,
    Roster,
    SignedRoster,
    device_id_from_public_key,
    generate_private_key,
    household_id,
    sign_roster,
    verify_roster,
)
from cetd.ids import DeviceId

CA = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


def _device() -> DeviceId:
    return device_id_from_public_key(generate_private_key().public_key())


def _roster(ca_cert: x509.Certificate) -> tuple[Roster, DeviceId]:
    first = _device()
    roster = Roster(
        version=1,
        household_id=household_id(ca_cert),
        members=(Member(device_id=first, name="first", added_at=1.5),),
    )
    return roster, first


@pytest.mark.timeout(10)
def test_membership_changes_bump_the_version(household_ca: CA) -> None:
    roster, first = _roster(household_ca[1])
    second = _device()
    assert roster.is_member(first)
    assert not roster.is_member(second)
    grown = roster.with_member(Member(device_id=second, name="second", kind="client", added_at=2.0))
    assert grown.version == 2
    assert grown.is_member(second)
    revoked = grown.with_revoked(first)
    assert revoked.version == 3
    assert not revoked.is_member(first)
    assert revoked.is_member(second)
    assert revoked.member(first) is not None  # still named, for display
    assert [m.device_id for m in revoked.active_members()] == [second]
    renamed = revoked.with_member(Member(device_id=second, name="renamed", added_at=2.0))
    assert renamed.version == 4
    assert len(renamed.members) == 2
    member = renamed.member(second)
    assert member is not None
    assert member.name == "renamed"
    with pytest.raises(IdentityError, match="was revoked"):
        renamed.with_member(Member(device_id=first, name="back again", added_at=3.0))


@pytest.mark.timeout(10)
def test_json_is_canonical_and_round_trips(household_ca: CA) -> None:
    roster, _ = _roster(household_ca[1])
    a, b = _device(), _device()
    one = roster.with_member(Member(device_id=a, name="a", added_at=1.0)).with_member(
        Member(device_id=b, name="b", added_at=2.0)
    )
    other = roster.with_member(Member(device_id=b, name="b", added_at=2.0)).with_member(
        Member(device_id=a, name="a", added_at=1.0)
    )
    assert one == other
    assert one.to_json() == other.to_json()
    assert Roster.from_json(one.to_json()) == one
    assert b" " not in one.to_json()
    with pytest.raises(IdentityError, match="roster document is malformed"):
        Roster.from_json(b'{"format": 1}')


@pytest.mark.timeout(10)
def test_signed_roster_verifies_and_survives_storage(household_ca: CA) -> None:
    ca_key, ca_cert = household_ca
    roster, _ = _roster(ca_cert)
    signed = sign_roster(roster, ca_key)
    assert verify_roster(signed, ca_cert) == roster
    assert verify_roster(SignedRoster.from_bytes(signed.to_bytes()), ca_cert) == roster


@pytest.mark.timeout(10)
def test_tampered_roster_is_rejected(household_ca: CA) -> None:
    ca_key, ca_cert = household_ca
    roster, first = _roster(ca_cert)
    signed = sign_roster(roster, ca_key)
    intruder = _device()
    forged = signed.document.replace(first.encode(), intruder.encode())
    with pytest.raises(IdentityError, match="roster signature invalid"):
        verify_roster(SignedRoster(document=forged, signature=signed.signature), ca_cert)
    bumped = signed.document.replace(b'"version":1', b'"version":9')
    with pytest.raises(IdentityError, match="roster signature invalid"):
        verify_roster(SignedRoster(document=bumped, signature=signed.signature), ca_cert)


@pytest.mark.timeout(10)
def test_roster_signed_by_another_household_is_rejected(household_ca: CA, other_household_ca: CA) -> None:
    roster, _ = _roster(household_ca[1])
    with pytest.raises(IdentityError, match="roster signature invalid"):
        verify_roster(sign_roster(roster, other_household_ca[0]), household_ca[1])
    # Validly signed by the other CA, but claiming this household's ID.
    other_key, other_cert = other_household_ca
    with pytest.raises(IdentityError, match="roster belongs to another household"):
        verify_roster(sign_roster(roster, other_key), other_cert)


@pytest.mark.timeout(10)
def test_invalid_rosters_cannot_be_built(household_ca: CA) -> None:
    device = _device()
    with pytest.raises(IdentityError, match="twice"):
        Roster(
            version=1,
            household_id=household_id(household_ca[1]),
            members=(
                Member(device_id=device, name="a", added_at=0),
                Member(device_id=device, name="b", added_at=0),
            ),
        )
    with pytest.raises(IdentityError, match="kind"):
        Member(device_id=device, name="a", kind="toaster", added_at=0)
