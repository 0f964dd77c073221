"""Identity: device keys and IDs, the household CA, join tokens, the signed roster and the state directory.

This layer imports only ``cryptography`` and the standard library (no torch, no grpc), so every other layer
and the command-line tools may use it.
"""

from __future__ import annotations

from cetd.identity.admission import (
    Admission,
    PendingRequest,
    PendingRequests,
    admit_device,
    admit_with_token,
    recertify_member,
    revoke_device,
)
from cetd.identity.ca import (
    ca_fingerprint,
    certificate_name,
    certificate_pem,
    check_device_name,
    check_issued_by,
    create_household_ca,
    device_id_from_certificate,
    household_id,
    issue_device_certificate,
    load_certificate,
    peer_device_id_from_pem,
    tls_server_name,
)
from cetd.identity.csr import csr_der, load_csr, make_csr, requested_name
from cetd.identity.keys import (
    device_id_from_public_key,
    generate_private_key,
    load_private_key,
    parse_device_id,
    private_key_pem,
    short_id,
    write_file_atomic,
    write_private_key,
)
from cetd.identity.roster import Member, Roster, SignedRoster, sign_roster, verify_roster
from cetd.identity.state import (
    HouseholdRecord,
    Identity,
    StateDir,
    init_household,
    load_ca_key,
    load_identity,
    load_or_create_device_key,
    load_roster,
    load_signed_roster,
    store_enrollment,
    store_roster,
)
from cetd.identity.tls import fetch_peer_chain, trusted_ca_from_chain, verification_code
from cetd.identity.tokens import IssuedToken, JoinToken, TokenStore, token_proof

__all__ = [
    "Admission",
    "HouseholdRecord",
    "Identity",
    "IssuedToken",
    "JoinToken",
    "Member",
    "PendingRequest",
    "PendingRequests",
    "Roster",
    "SignedRoster",
    "StateDir",
    "TokenStore",
    "admit_device",
    "admit_with_token",
    "ca_fingerprint",
    "certificate_name",
    "certificate_pem",
    "check_device_name",
    "check_issued_by",
    "create_household_ca",
    "csr_der",
    "device_id_from_certificate",
    "device_id_from_public_key",
    "fetch_peer_chain",
    "generate_private_key",
    "household_id",
    "init_household",
    "issue_device_certificate",
    "load_ca_key",
    "load_certificate",
    "load_csr",
    "load_identity",
    "load_or_create_device_key",
    "load_private_key",
    "load_roster",
    "load_signed_roster",
    "make_csr",
    "parse_device_id",
    "peer_device_id_from_pem",
    "private_key_pem",
    "recertify_member",
    "requested_name",
    "revoke_device",
    "short_id",
    "sign_roster",
    "store_enrollment",
    "store_roster",
    "tls_server_name",
    "token_proof",
    "trusted_ca_from_chain",
    "verification_code",
    "verify_roster",
    "write_file_atomic",
    "write_private_key",
]
