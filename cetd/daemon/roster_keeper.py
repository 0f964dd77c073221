"""Holds the household's signed roster: who is a member and who was revoked.

Every member keeps the newest validly signed roster it has seen and persists it. Only the CA holder
can make a new version (it alone has the CA key, see `cetd.identity.admission`); the others accept a pushed or pulled roster only if
the CA signature checks and the version is higher, so a compromised member cannot forge membership.
"""

from __future__ import annotations

import logging

from cetd.errors import IdentityError, NotAuthorizedError
from cetd.identity import (
    Identity,
    Roster,
    SignedRoster,
    StateDir,
    load_signed_roster,
    store_roster,
    verify_roster,
)
from cetd.ids import DeviceId

logger = logging.getLogger(__name__)


class RosterKeeper:
    """The current roster of one daemon, with the per-call membership check."""

    def __init__(self, state: StateDir, identity: Identity) -> None:
        self._state = state
        self._identity = identity
        self._signed = load_signed_roster(state)
        self._roster = verify_roster(self._signed, identity.ca_certificate)

    @property
    def roster(self) -> Roster:
        return self._roster

    @property
    def signed(self) -> SignedRoster:
        return self._signed

    @property
    def version(self) -> int:
        return self._roster.version

    def authorize(self, device_id: DeviceId) -> None:
        """Raise `NotAuthorizedError` unless ``device_id`` is a current member."""
        if device_id in self._roster.revoked:
            raise NotAuthorizedError(f"device {device_id} was revoked from this household")
        if not self._roster.is_member(device_id):
            raise NotAuthorizedError(f"device {device_id} is not a member of this household")

    def accept(self, signed: SignedRoster, *, already_stored: bool = False) -> bool:
        """Adopt ``signed`` if it is validly signed and newer; return whether it was adopted.

        Args:
            already_stored: the CA holder's admission code wrote it to disk already.

        Raises:
            IdentityError: the signature does not verify or the roster is for another household.
        """
        roster = verify_roster(signed, self._identity.ca_certificate)
        if roster.household_id != self._identity.household_id:
            raise IdentityError("roster belongs to another household")
        if roster.version <= self._roster.version:
            return False
        if not already_stored:
            store_roster(self._state, signed)
        self._signed, self._roster = signed, roster
        logger.info("roster version %d adopted (%d members, %d revoked)",
                    roster.version, len(roster.active_members()), len(roster.revoked))
        return True
