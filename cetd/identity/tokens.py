"""One-time join tokens: the invite a household member hands to a new device.

A token names itself (``token_id``), carries a secret, an expiry and the fingerprint of the household CA.
The new device uses the fingerprint to make sure it talks to the right household before it sends anything,
and proves it knows the secret with an HMAC over its certificate request, so the secret itself never
crosses the network and a proof cannot be replayed for another key. The CA holder keeps the issued tokens
in a `TokenStore` and accepts each one once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cetd.errors import TokenError
from cetd.identity.keys import PRIVATE_FILE_MODE, write_file_atomic

TOKEN_PREFIX = "cetd"
TOKEN_VERSION = 1
TOKEN_RETENTION = timedelta(days=7)
"""How long expired or used tokens are remembered (to say "already used" rather than "unknown")."""

_TOKEN_ID_BYTES = 8
_SECRET_BYTES = 16
_FINGERPRINT_BYTES = 32
_CHECKSUM_BYTES = 4
# token id, secret, expiry (IEEE double, so any float round-trips), CA fingerprint.
_PACKING = struct.Struct(f">{_TOKEN_ID_BYTES}s{_SECRET_BYTES}sd{_FINGERPRINT_BYTES}s")
_PROOF_CONTEXT = b"cetd-join-proof-v1\0"
_TOKEN_ID_PATTERN = re.compile(r"^[0-9a-f]{16}$")
_STORE_FORMAT = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class JoinToken:
    """An invite to join one household, valid once and until ``expires_at``."""

    token_id: str
    """16 lowercase hex digits naming the token in the CA holder's store; not secret."""
    secret: bytes = field(repr=False)
    """16 random bytes; whoever knows them may join once."""
    expires_at: float
    """Expiry, seconds since the epoch."""
    ca_fingerprint: bytes
    """SHA-256 of the household CA certificate's DER, pinning the household the token belongs to."""

    def __post_init__(self) -> None:
        if not _TOKEN_ID_PATTERN.match(self.token_id):
            raise TokenError(f"join token id {self.token_id!r} is not 16 lowercase hex digits")
        if len(self.secret) != _SECRET_BYTES:
            raise TokenError(f"join token secret must be {_SECRET_BYTES} bytes")
        if len(self.ca_fingerprint) != _FINGERPRINT_BYTES:
            raise TokenError(f"join token CA fingerprint must be {_FINGERPRINT_BYTES} bytes")

    def encode(self) -> str:
        """Return the token as text: ``cetd1.`` then URL-safe base64 (no padding) of the packed fields
        followed by a 4-byte checksum that catches copy-and-paste damage."""
        packed = _PACKING.pack(bytes.fromhex(self.token_id), self.secret, self.expires_at, self.ca_fingerprint)
        packed += hashlib.sha256(packed).digest()[:_CHECKSUM_BYTES]
        body = base64.urlsafe_b64encode(packed).rstrip(b"=").decode("ascii")
        return f"{TOKEN_PREFIX}{TOKEN_VERSION}.{body}"

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        """Parse a token produced by `encode` (surrounding whitespace is ignored).

        Raises:
            TokenError: "not a cetd join token", "unsupported token version", "truncated token" or
                "damaged token" with details.
        """
        text = text.strip()
        match = re.fullmatch(rf"{TOKEN_PREFIX}(\d+)\.([A-Za-z0-9_-]*)", text)
        if match is None:
            raise TokenError("not a cetd join token (expected text starting with 'cetd1.')")
        if int(match.group(1)) != TOKEN_VERSION:
            raise TokenError(
                f"unsupported token version {match.group(1)} (this cetd understands version {TOKEN_VERSION})"
            )
        body = match.group(2)
        try:
            packed = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise TokenError("truncated token (its length is impossible); copy it again") from None
        expected = _PACKING.size + _CHECKSUM_BYTES
        if len(packed) < expected:
            raise TokenError(f"truncated token ({len(packed)} of {expected} bytes); copy it again")
        if len(packed) > expected:
            raise TokenError(f"not a cetd join token (it is {len(packed) - expected} bytes too long)")
        fields, checksum = packed[: _PACKING.size], packed[_PACKING.size :]
        if not hmac.compare_digest(hashlib.sha256(fields).digest()[:_CHECKSUM_BYTES], checksum):
            raise TokenError("damaged token (checksum mismatch); copy it again")
        token_id, secret, expires_at, fingerprint = _PACKING.unpack(fields)
        return cls(token_id=token_id.hex(), secret=secret, expires_at=expires_at, ca_fingerprint=fingerprint)


def token_proof(secret: bytes, csr_der: bytes) -> bytes:
    """Return the HMAC-SHA256 proof that the holder of ``secret`` sent the certificate request ``csr_der``."""
    return hmac.new(secret, _PROOF_CONTEXT + csr_der, hashlib.sha256).digest()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedToken:
    """The CA holder's record of one token, as listed by `TokenStore.outstanding`."""

    token_id: str
    issued_at: float
    expires_at: float
    used_at: float | None


class TokenStore:
    """The join tokens a CA holder issued, kept in a JSON file (mode 0600, replaced atomically).

    Each operation re-reads the file under a lock, so several stores on the same path in one process stay
    consistent; tokens that expired or were used more than `TOKEN_RETENTION` ago are dropped on writes.
    """

    def __init__(self, path: Path | str, *, ca_fingerprint: bytes) -> None:
        """Args:
        path: the JSON file (created on the first `issue`).
        ca_fingerprint: fingerprint of this household's CA, written into every issued token.
        """
        if len(ca_fingerprint) != _FINGERPRINT_BYTES:
            raise TokenError(f"CA fingerprint must be {_FINGERPRINT_BYTES} bytes")
        self._path = Path(path)
        self._ca_fingerprint = ca_fingerprint
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The JSON file holding the tokens."""
        return self._path

    def issue(self, ttl: timedelta, now: float | None = None) -> JoinToken:
        """Create, persist and return a new token valid for ``ttl`` from ``now`` (epoch seconds)."""
        if ttl <= timedelta(0):
            raise TokenError(f"a join token must be valid for a positive time, not {ttl}")
        moment = time.time() if now is None else now
        token = JoinToken(
            token_id=secrets.token_hex(_TOKEN_ID_BYTES),
            secret=secrets.token_bytes(_SECRET_BYTES),
            expires_at=moment + ttl.total_seconds(),
            ca_fingerprint=self._ca_fingerprint,
        )
        with self._lock:
            records = self._read()
            records[token.token_id] = {
                "secret": token.secret.hex(),
                "issued_at": moment,
                "expires_at": token.expires_at,
                "used_at": None,
            }
            self._write(records, moment)
        return token

    def redeem(self, token_id: str, proof: bytes, csr_der: bytes, now: float | None = None) -> None:
        """Accept token ``token_id`` once, for the certificate request ``csr_der`` proven with ``proof``.

        The proof is checked first (in constant time), so someone who only saw a token ID learns nothing
        about it; on success the token is marked used on disk before this returns.

        Raises:
            TokenError: the token is unknown (not issued by this household), its proof does not match,
                it was already used, or it has expired.
        """
        moment = time.time() if now is None else now
        with self._lock:
            records = self._read()
            record = records.get(token_id)
            if record is None:
                raise TokenError("unknown join token (not issued by this household)")
            expected = token_proof(bytes.fromhex(record["secret"]), csr_der)
            if not hmac.compare_digest(expected, proof):
                raise TokenError("join token proof does not match")
            if record["used_at"] is not None:
                raise TokenError("join token already used")
            if moment >= record["expires_at"]:
                raise TokenError(f"join token expired at {_iso(record['expires_at'])}")
            record["used_at"] = moment
            self._write(records, moment)

    def outstanding(self, now: float | None = None) -> tuple[IssuedToken, ...]:
        """Return the tokens that can still be redeemed at ``now``, oldest first."""
        moment = time.time() if now is None else now
        with self._lock:
            records = self._read()
        tokens = (
            IssuedToken(
                token_id=token_id,
                issued_at=record["issued_at"],
                expires_at=record["expires_at"],
                used_at=record["used_at"],
            )
            for token_id, record in records.items()
        )
        return tuple(
            sorted(
                (t for t in tokens if t.used_at is None and t.expires_at > moment),
                key=lambda t: (t.issued_at, t.token_id),
            )
        )

    def cancel(self, token_id: str, now: float | None = None) -> bool:
        """Forget token ``token_id`` so it can no longer be redeemed; return whether it existed."""
        moment = time.time() if now is None else now
        with self._lock:
            records = self._read()
            if records.pop(token_id, None) is None:
                return False
            self._write(records, moment)
            return True

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            document = json.loads(self._path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise TokenError(f"join token store {self._path} is unreadable or corrupt: {error}") from None
        if not isinstance(document, dict) or document.get("format") != _STORE_FORMAT:
            raise TokenError(f"join token store {self._path} has an unknown format")
        tokens = document.get("tokens")
        if not isinstance(tokens, dict):
            raise TokenError(f"join token store {self._path} is corrupt")
        return tokens

    def _write(self, records: dict[str, dict[str, Any]], now: float) -> None:
        horizon = now - TOKEN_RETENTION.total_seconds()
        kept = {
            token_id: record
            for token_id, record in records.items()
            if record["expires_at"] > horizon and (record["used_at"] is None or record["used_at"] > horizon)
        }
        document = {"format": _STORE_FORMAT, "tokens": kept}
        data = json.dumps(document, sort_keys=True, indent=1).encode("utf-8")
        write_file_atomic(self._path, data, PRIVATE_FILE_MODE)
