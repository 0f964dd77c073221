"""Trust on first contact: learning and pinning a household's CA from the chain a member's server presents.

A joining device has no CA certificate yet, so it connects without verification, takes the chain the server
presents ([device certificate, CA certificate]) and decides whether to trust that CA: with a join token it
compares the CA's fingerprint with the one in the token; with owner approval both screens show a short
verification code computed from the CA and the device key, and the owner compares them. Nothing secret is
sent over this unverified connection.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from cetd.errors import IdentityError, TokenError
from cetd.identity.ca import ca_fingerprint
from cetd.identity.keys import public_key_der

_VERIFICATION_CONTEXT = b"cetd-verification-code-v1\0"


def _chain_der(tls_socket: ssl.SSLSocket) -> list[bytes]:
    """Return the DER of every certificate the server presented, leaf first, without verifying them."""
    getter: Any = getattr(tls_socket, "get_unverified_chain", None)
    if getter is None:
        # Python < 3.13: the method exists only on the private C object; it returns `_ssl.Certificate`s.
        getter = getattr(tls_socket._sslobj, "get_unverified_chain", None)  # type: ignore[attr-defined]  # private CPython API, checked at run time
    if getter is None:
        raise IdentityError("this Python's ssl module cannot return a server's certificate chain")
    chain = getter() or []
    return [
        item if isinstance(item, bytes) else item.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]  # _ssl exposes the DER constant only privately
        for item in chain
    ]


def fetch_peer_chain(host: str, port: int, timeout: timedelta) -> list[x509.Certificate]:
    """Connect to ``host:port`` with TLS (ALPN ``h2``, no verification) and return the presented chain.

    Raises:
        IdentityError: the peer could not be reached, the handshake failed, or it presented no certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout.total_seconds()) as raw,
            context.wrap_socket(raw, server_hostname=None) as tls_socket,
        ):
            chain = _chain_der(tls_socket)
    except (OSError, ssl.SSLError) as error:
        raise IdentityError(f"could not fetch the certificate of {host}:{port}: {error}") from None
    if not chain:
        raise IdentityError(f"the device at {host}:{port} presented no certificate")
    try:
        return [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError:
        raise IdentityError(f"the device at {host}:{port} presented a malformed certificate") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def trusted_ca_from_chain(
    chain: list[x509.Certificate], expected_fingerprint: bytes | None, *, peer: str = "the other end"
) -> x509.Certificate:
    """Pick the household CA out of a presented chain and check it.

    Args:
        chain: certificates as presented, leaf first (see `fetch_peer_chain`).
        expected_fingerprint: the CA fingerprint from a join token; None when the owner will compare
            verification codes instead.
        peer: the peer's address, for messages.

    Returns:
        The CA certificate that directly issued the leaf.

    Raises:
        TokenError: no CA in the chain, the leaf is not issued by it, or its fingerprint is not the expected
            one (another household).
    """
    if not chain:
        raise TokenError(f"the device at {peer} presented no certificate")
    leaf = chain[0]
    for candidate in chain[1:]:
        if not _is_ca(candidate):
            continue
        try:
            leaf.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        if expected_fingerprint is not None and not hmac.compare_digest(
            ca_fingerprint(candidate), expected_fingerprint
        ):
            raise TokenError(f"the device at {peer} belongs to another household (CA fingerprint mismatch)")
        return candidate
    if expected_fingerprint is not None:
        raise TokenError(f"the device at {peer} belongs to another household (CA fingerprint mismatch)")
    raise TokenError(f"the device at {peer} did not present the household CA that issued its certificate")


def verification_code(ca_fingerprint: bytes, device_public_key: PublicKeyTypes) -> str:
    """Return the six-digit code (``"123-456"``) both screens show while the owner approves a device.

    It binds the household CA the new device sees to the key the owner is about to admit, so a device in the
    middle would show a different code on one of the two screens.
    """
    digest = hashlib.sha256(_VERIFICATION_CONTEXT + ca_fingerprint + public_key_der(device_public_key)).digest()
    number = int.from_bytes(digest[:8], "big") % 1_000_000
    return f"{number // 1000:03d}-{number % 1000:03d}"
