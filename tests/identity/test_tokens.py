"""Join tokens: encoding and the CA holder's one-time redemption."""

from __future__ import annotations

import json
import stat
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from cetd.errors import TokenError
from cetd.identity import JoinToken, TokenStore, csr_der, generate_private_key, make_csr, token_proof
from cetd.identity.tokens import TOKEN_RETENTION

FINGERPRINT = bytes(range(32))
NOW = 1_750_000_000.0


def _store(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path / "tokens.json", ca_fingerprint=FINGERPRINT)


@pytest.fixture(scope="module")
def request_der() -> bytes:
    return csr_der(make_csr(generate_private_key(), "new device"))


@pytest.mark.timeout(10)
def test_token_encodes_compactly_and_round_trips(tmp_path: Path) -> None:
    token = _store(tmp_path).issue(timedelta(hours=1), NOW + 0.25)
    text = token.encode()
    assert text.startswith("cetd1.")
    assert len(text) == len("cetd1.") + 91  # 68 bytes of base64 without padding
    assert "=" not in text
    assert JoinToken.decode(f"  {text}\n") == token
    assert token.expires_at == NOW + 3600.25
    assert token.ca_fingerprint == FINGERPRINT
    assert len(token.token_id) == 16
    assert len(token.secret) == 16
    assert token.secret.hex() not in repr(token)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda t: "hello world", "not a cetd join token"),
        (lambda t: t.replace("cetd1.", "cetd2.", 1), "unsupported token version 2"),
        (lambda t: t[:40], "truncated token"),
        (lambda t: t + "AAAA", "not a cetd join token"),
        (lambda t: t[:20] + ("B" if t[20] != "B" else "C") + t[21:], "damaged token"),
    ],
)
def test_malformed_tokens_say_why(tmp_path: Path, mangle: object, reason: str) -> None:
    text = _store(tmp_path).issue(timedelta(hours=1), NOW).encode()
    assert callable(mangle)
    with pytest.raises(TokenError, match=reason):
        JoinToken.decode(mangle(text))


@pytest.mark.timeout(10)
def test_redeem_once_then_already_used(tmp_path: Path, request_der: bytes) -> None:
    store = _store(tmp_path)
    token = store.issue(timedelta(minutes=30), NOW)
    proof = token_proof(token.secret, request_der)
    store.redeem(token.token_id, proof, request_der, NOW + 60)
    # Persisted: a fresh store on the same file (e.g. after a restart) still refuses it.
    with pytest.raises(TokenError, match="join token already used"):
        _store(tmp_path).redeem(token.token_id, proof, request_der, NOW + 61)
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600


@pytest.mark.timeout(10)
def test_expired_token_is_refused_with_its_expiry(tmp_path: Path, request_der: bytes) -> None:
    store = _store(tmp_path)
    token = store.issue(timedelta(minutes=30), NOW)
    proof = token_proof(token.secret, request_der)
    with pytest.raises(TokenError, match=r"join token expired at 2025-06-15T15:36:40\+00:00"):
        store.redeem(token.token_id, proof, request_der, NOW + 1800)
    # A refused (expired) attempt does not consume anything: still expired, not "used".
    with pytest.raises(TokenError, match="expired"):
        store.redeem(token.token_id, proof, request_der, NOW + 1900)


@pytest.mark.timeout(10)
def test_unknown_token_is_refused(tmp_path: Path, request_der: bytes) -> None:
    store = _store(tmp_path)
    store.issue(timedelta(minutes=30), NOW)
    foreign = TokenStore(tmp_path / "other.json", ca_fingerprint=FINGERPRINT).issue(timedelta(hours=1), NOW)
    with pytest.raises(TokenError, match=r"unknown join token \(not issued by this household\)"):
        store.redeem(foreign.token_id, token_proof(foreign.secret, request_der), request_der, NOW)


@pytest.mark.timeout(10)
def test_tampered_proof_or_other_request_is_refused_and_does_not_consume(tmp_path: Path, request_der: bytes) -> None:
    store = _store(tmp_path)
    token = store.issue(timedelta(minutes=30), NOW)
    proof = bytearray(token_proof(token.secret, request_der))
    proof[0] ^= 0x80
    with pytest.raises(TokenError, match="join token proof does not match"):
        store.redeem(token.token_id, bytes(proof), request_der, NOW)
    # The proof binds the request: a valid proof for one CSR does not admit another key.
    other_der = csr_der(make_csr(generate_private_key(), "intruder"))
    with pytest.raises(TokenError, match="proof does not match"):
        store.redeem(token.token_id, token_proof(token.secret, request_der), other_der, NOW)
    store.redeem(token.token_id, token_proof(token.secret, request_der), request_der, NOW)


@pytest.mark.timeout(10)
def test_old_tokens_are_pruned_and_outstanding_lists_live_ones(tmp_path: Path, request_der: bytes) -> None:
    store = _store(tmp_path)
    old = store.issue(timedelta(minutes=5), NOW)
    used = store.issue(timedelta(hours=1), NOW)
    store.redeem(used.token_id, token_proof(used.secret, request_der), request_der, NOW + 1)
    live = store.issue(timedelta(days=30), NOW + 2)
    assert [t.token_id for t in store.outstanding(NOW + 3)] == [old.token_id, live.token_id]
    later = NOW + TOKEN_RETENTION.total_seconds() + 3600
    store.issue(timedelta(hours=1), later)  # any write prunes
    remembered = json.loads((tmp_path / "tokens.json").read_text())["tokens"]
    assert old.token_id not in remembered
    assert used.token_id not in remembered
    assert live.token_id in remembered
    assert store.cancel(live.token_id, later) is True
    assert store.cancel(live.token_id, later) is False
    with pytest.raises(TokenError, match="unknown join token"):
        store.redeem(live.token_id, token_proof(live.secret, request_der), request_der, later)


@pytest.mark.timeout(30)
def test_concurrent_redeems_admit_exactly_one(tmp_path: Path, request_der: bytes) -> None:
    store = _store(tmp_path)
    token = store.issue(timedelta(hours=1), NOW)
    proof = token_proof(token.secret, request_der)
    outcomes: list[str] = []

    def attempt() -> None:
        try:
            store.redeem(token.token_id, proof, request_der, NOW)
            outcomes.append("ok")
        except TokenError as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["join token already used"] * 7 + ["ok"]


@pytest.mark.timeout(10)
def test_nonpositive_ttl_and_corrupt_store_are_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with pytest.raises(TokenError, match="positive time"):
        store.issue(timedelta(0), NOW)
    (tmp_path / "tokens.json").write_text("{not json")
    with pytest.raises(TokenError, match="unreadable or corrupt"):
        store.issue(timedelta(hours=1), NOW)
