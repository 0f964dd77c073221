"""The joining side: a device without a certificate gets one, by invite token or by owner approval.

With a token, the household is pinned by the CA fingerprint in the token: the CA certificate that an
enrollment endpoint presents must match it, so a device on the LAN pretending to be the household
learns nothing and gets nothing. Without a token the device trusts the CA it is shown on first use,
files a pending request and prints a verification code that the owner compares before approving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from cetd.errors import CetdError, IdentityError, NotAuthorizedError, TokenError, UnavailableError
from cetd.identity import (
    Identity,
    JoinToken,
    SignedRoster,
    StateDir,
    ca_fingerprint,
    certificate_pem,
    csr_der,
    device_id_from_certificate,
    device_id_from_public_key,
    fetch_peer_chain,
    load_identity,
    load_or_create_device_key,
    make_csr,
    store_enrollment,
    tls_server_name,
    token_proof,
    trusted_ca_from_chain,
    verification_code,
)
from cetd.transport.household_client import enroll
from cetd.transport.peer_info import Capabilities, EnrollRequest, EnrollStatus

logger = logging.getLogger(__name__)

CandidateSource = Callable[[], Awaitable[list[tuple[str, int]]]]
"""Returns enrollment endpoints (host, port) to try: from mDNS, or the one given with --peer."""


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinOutcome:
    identity: Identity
    via: str
    """host:port of the enrollment endpoint that admitted this device."""


async def join_household(
    state: StateDir,
    *,
    name: str,
    capabilities: Capabilities,
    candidates: CandidateSource,
    token: JoinToken | None,
    wait: timedelta = timedelta(minutes=10),
    poll_interval: timedelta = timedelta(seconds=1),
    on_pending: Callable[[str, str], None] | None = None,
) -> JoinOutcome:
    """Join a household; returns once this device holds a certificate and a roster.

    Args:
        token: an invite token; None asks for owner approval.
        wait: how long to keep looking for an enrollment endpoint and, without a token, to wait for
            the owner's approval.
        on_pending: called once with (device ID, verification code) when the request is pending.

    Raises:
        TokenError: the token is expired or used, or every endpoint found belongs to another household.
        NotAuthorizedError: the household refused this device (e.g. it was revoked).
        UnavailableError: no enrollment endpoint answered within ``wait``.
    """
    if token is not None and token.expires_at < time.time():
        raise TokenError(f"join token expired at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(token.expires_at))}")
    key = load_or_create_device_key(state)
    device_id = device_id_from_public_key(key.public_key())
    csr_pem = make_csr(key, name)
    request = EnrollRequest(
        csr_pem=csr_pem, name=name, capabilities=capabilities,
        token_id=token.token_id if token else "",
        token_proof=token_proof(token.secret, csr_der(csr_pem)) if token else b"",
    )
    deadline = time.monotonic() + wait.total_seconds()
    foreign: set[str] = set()
    announced: set[bytes] = set()  # CA fingerprints whose verification code was shown
    last_error: CetdError | None = None
    while time.monotonic() < deadline:
        for host, port in await candidates():
            address = f"{host}:{port}"
            try:
                chain = await asyncio.to_thread(fetch_peer_chain, host, port, timedelta(seconds=2))
                ca = trusted_ca_from_chain(chain, token.ca_fingerprint if token else None)
            except TokenError as error:
                if address not in foreign:
                    logger.info("skipping %s: %s", address, error)
                foreign.add(address)
                last_error = error
                continue
            except (OSError, CetdError) as error:
                logger.debug("enrollment endpoint %s not usable: %s", address, error)
                continue
            server_id = device_id_from_certificate(chain[0])
            try:
                result = await enroll(address, ca_pem=certificate_pem(ca),
                                      tls_server_name=tls_server_name(server_id), request=request)
            except UnavailableError as error:
                logger.debug("enrollment endpoint %s not usable: %s", address, error)
                continue
            if result.status is EnrollStatus.REJECTED:
                raise NotAuthorizedError(f"the household refused this device: {result.reason}")
            if result.status is EnrollStatus.APPROVED:
                if result.roster is None:
                    raise IdentityError("enrollment endpoint approved but sent no roster")
                store_enrollment(state, result.certificate_pem, result.ca_certificate_pem,
                                 SignedRoster(document=result.roster.document, signature=result.roster.signature),
                                 name)
                identity = load_identity(state)
                logger.info("joined household %s as device %s via %s", identity.household_id, device_id, address)
                return JoinOutcome(identity=identity, via=address)
            fingerprint = ca_fingerprint(ca)
            if fingerprint not in announced:
                # Each household seen gets its own code: the owner compares the one their cetctl shows.
                code = verification_code(fingerprint, key.public_key())
                logger.info("waiting for the owner of household %s to approve device %s; verification code %s",
                            fingerprint.hex()[:8], device_id, code)
                if on_pending is not None:
                    on_pending(device_id, code)
                announced.add(fingerprint)
        await asyncio.sleep(poll_interval.total_seconds())
    if last_error is not None and foreign:
        raise TokenError(
            f"the token's household was not found: every household seen ({len(foreign)} endpoint(s)) has "
            "another CA fingerprint"
        )
    if announced:
        raise UnavailableError(f"the owner did not approve device {device_id} within {wait}")
    raise UnavailableError(f"no household member with an enrollment endpoint answered within {wait}")
