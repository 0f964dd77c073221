"""Fetching and pinning a household CA from a real TLS server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from cetd.errors import IdentityError, TokenError
from cetd.identity import (
    JoinToken,
    Member,
    StateDir,
    ca_fingerprint,
    certificate_pem,
    csr_der,
    device_id_from_certificate,
    fetch_peer_chain,
    generate_private_key,
    init_household,
    issue_device_certificate,
    load_ca_key,
    load_csr,
    load_or_create_device_key,
    load_roster,
    make_csr,
    private_key_pem,
    sign_roster,
    store_enrollment,
    store_roster,
    tls_server_name,
    token_proof,
    trusted_ca_from_chain,
    verification_code,
    write_file_atomic,
)

CA = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


@contextlib.contextmanager
def tls_server(
    chain_pem: bytes,
    key_pem: bytes,
    tmp_path: Path,
    *,
    client_ca_pem: bytes | None = None,
    client_certificates: list[bytes] | None = None,
) -> Iterator[int]:
    """Serve TLS (ALPN h2) on 127.0.0.1 presenting ``chain_pem`` until the block exits; yield the port.

    With ``client_ca_pem`` the server requires a client certificate issued by that CA and appends the DER of
    each verified one to ``client_certificates``.
    """
    write_file_atomic(tmp_path / "chain.pem", chain_pem, 0o644)
    write_file_atomic(tmp_path / "server.key", key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "chain.pem", tmp_path / "server.key")
    context.set_alpn_protocols(["h2"])
    if client_ca_pem is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        context.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.settimeout(5)
            with contextlib.suppress(OSError), context.wrap_socket(connection, server_side=True) as tls:
                peer = tls.getpeercert(binary_form=True)
                if peer is not None and client_certificates is not None:
                    client_certificates.append(peer)
                tls.recv(1)  # until the client closes

    thread = threading.Thread(target=serve, name="tls-test-server")
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
        assert not thread.is_alive()


def _leaf(household_ca: CA) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_key, ca_cert = household_ca
    key = generate_private_key()
    return issue_device_certificate(ca_key, ca_cert, key.public_key(), name="server"), key


@pytest.mark.timeout(30)
def test_fetch_returns_leaf_and_ca_and_pins_by_fingerprint(
    household_ca: CA, other_household_ca: CA, tmp_path: Path
) -> None:
    leaf, key = _leaf(household_ca)
    ca_cert = household_ca[1]
    chain_pem = certificate_pem(leaf) + certificate_pem(ca_cert)
    with tls_server(chain_pem, private_key_pem(key), tmp_path) as port:
        chain = fetch_peer_chain("127.0.0.1", port, timedelta(seconds=5))
        assert chain == [leaf, ca_cert]
        assert trusted_ca_from_chain(chain, ca_fingerprint(ca_cert), peer=f"127.0.0.1:{port}") == ca_cert
        assert trusted_ca_from_chain(chain, None) == ca_cert
        with pytest.raises(
            TokenError,
            match=rf"the device at 127.0.0.1:{port} belongs to another household \(CA fingerprint mismatch\)",
        ):
            trusted_ca_from_chain(chain, ca_fingerprint(other_household_ca[1]), peer=f"127.0.0.1:{port}")
        # Repeated fetches work (the server keeps serving).
        assert fetch_peer_chain("127.0.0.1", port, timedelta(seconds=5))[1] == ca_cert


@pytest.mark.timeout(10)
def test_ca_that_did_not_issue_the_leaf_is_not_trusted(household_ca: CA, other_household_ca: CA) -> None:
    leaf, _ = _leaf(household_ca)
    other_ca = other_household_ca[1]
    with pytest.raises(TokenError, match="belongs to another household"):
        trusted_ca_from_chain([leaf, other_ca], ca_fingerprint(other_ca))
    with pytest.raises(TokenError, match="did not present the household CA"):
        trusted_ca_from_chain([leaf, other_ca], None)
    with pytest.raises(TokenError, match="did not present the household CA"):
        trusted_ca_from_chain([leaf], None)
    with pytest.raises(TokenError, match="presented no certificate"):
        trusted_ca_from_chain([], None)


@pytest.mark.timeout(10)
def test_unreachable_peer_is_explained() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(IdentityError, match=f"could not fetch the certificate of 127.0.0.1:{port}"):
        fetch_peer_chain("127.0.0.1", port, timedelta(seconds=2))


@pytest.mark.timeout(10)
def test_verification_code_binds_ca_and_device_key(household_ca: CA, other_household_ca: CA) -> None:
    device = generate_private_key().public_key()
    code = verification_code(ca_fingerprint(household_ca[1]), device)
    assert len(code) == 7
    assert code[3] == "-"
    assert (code[:3] + code[4:]).isdigit()
    assert verification_code(ca_fingerprint(household_ca[1]), device) == code
    other_codes = {verification_code(ca_fingerprint(household_ca[1]), generate_private_key().public_key())}
    other_codes.add(verification_code(ca_fingerprint(other_household_ca[1]), device))
    assert code not in other_codes


@pytest.mark.timeout(30)
def test_issued_certificates_pass_strict_mutual_tls_with_the_server_name(tmp_path: Path) -> None:
    """What the transport relies on: each side trusts only the household CA, the client pins the server's
    device by its server name, and OpenSSL's strict X.509 checks accept the certificates."""
    owner = init_household(StateDir(tmp_path / "owner"), "owner", machine_id="m")
    ca_key = load_ca_key(StateDir(tmp_path / "owner"))
    client_key = generate_private_key()
    client_cert = issue_device_certificate(ca_key, owner.ca_certificate, client_key.public_key(), name="c")
    write_file_atomic(tmp_path / "ca.pem", owner.ca_pem, 0o644)
    write_file_atomic(tmp_path / "client.pem", certificate_pem(client_cert) + owner.ca_pem, 0o644)
    write_file_atomic(tmp_path / "client.key", private_key_pem(client_key))

    server_dir = tmp_path / "server"
    server_dir.mkdir()
    verified_clients: list[bytes] = []
    with tls_server(
        owner.cert_chain_pem,
        owner.key_pem,
        server_dir,
        client_ca_pem=owner.ca_pem,
        client_certificates=verified_clients,
    ) as port:
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_verify_locations(tmp_path / "ca.pem")
        client.verify_flags |= ssl.VERIFY_X509_STRICT
        client.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname=tls_server_name(owner.device_id)) as tls,
        ):
            peer = tls.getpeercert(binary_form=True)
            assert peer is not None
            assert device_id_from_certificate(x509.load_der_x509_certificate(peer)) == owner.device_id
            tls.sendall(b"x")  # lets the server finish reading the client's certificate
        # Pinning works: the same server refuses to pass as another device.
        other_name = tls_server_name(device_id_from_certificate(client_cert))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"),
        ):
            client.wrap_socket(raw, server_hostname=other_name)
    # The server verified the client's certificate against the household CA.
    assert [device_id_from_certificate(x509.load_der_x509_certificate(d)) for d in verified_clients] == [
        device_id_from_certificate(client_cert)
    ]


@pytest.mark.timeout(60)
def test_join_by_token_end_to_end(tmp_path: Path) -> None:
    """Owner issues a token; the new device pins the CA over TLS, proves the token and enrolls."""
    owner_state = StateDir(tmp_path / "owner")
    owner = init_household(owner_state, "owner", machine_id="m")
    text = owner_state.token_store().issue(timedelta(minutes=10)).encode()

    joiner_state = StateDir(tmp_path / "joiner")
    token = JoinToken.decode(text)
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    with tls_server(owner.cert_chain_pem, owner.key_pem, server_dir) as port:
        chain = fetch_peer_chain("127.0.0.1", port, timedelta(seconds=5))
    ca_cert = trusted_ca_from_chain(chain, token.ca_fingerprint, peer=f"127.0.0.1:{port}")
    key = load_or_create_device_key(joiner_state, machine_id="m")
    request_pem = make_csr(key, "joiner")
    proof = token_proof(token.secret, csr_der(request_pem))

    # On the CA holder, as the Join RPC would run it.
    owner_state.token_store().redeem(token.token_id, proof, csr_der(request_pem))
    request, device_id = load_csr(request_pem)
    ca_key = load_ca_key(owner_state)
    cert = issue_device_certificate(ca_key, owner.ca_certificate, request.public_key(), name="joiner")
    roster = load_roster(owner_state).with_member(Member(device_id=device_id, name="joiner", added_at=1.0))
    signed = sign_roster(roster, ca_key)
    assert store_roster(owner_state, signed)

    identity = store_enrollment(
        joiner_state, certificate_pem(cert), certificate_pem(ca_cert), signed, "joiner", machine_id="m"
    )
    assert identity.household_id == owner.household_id
    assert identity.device_id == device_id
    assert load_roster(joiner_state).is_member(owner.device_id)
    with pytest.raises(TokenError, match="already used"):
        owner_state.token_store().redeem(token.token_id, proof, csr_der(request_pem))


@pytest.mark.timeout(30)
def test_fetch_works_against_a_server_that_requires_client_certificates(household_ca: CA, tmp_path: Path) -> None:
    """A joining device has no certificate yet; with TLS 1.3 it still sees the chain before the server
    rejects it, so a member's mutual-TLS port serves as the pinning endpoint too."""
    leaf, key = _leaf(household_ca)
    ca_pem = certificate_pem(household_ca[1])
    with tls_server(certificate_pem(leaf) + ca_pem, private_key_pem(key), tmp_path, client_ca_pem=ca_pem) as port:
        chain = fetch_peer_chain("127.0.0.1", port, timedelta(seconds=5))
    assert chain == [leaf, household_ca[1]]


@pytest.mark.timeout(10)
def test_silent_peer_times_out() -> None:
    """A peer that accepts TCP but never answers the handshake costs the timeout, not forever."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(IdentityError, match="timed out"):
            fetch_peer_chain("127.0.0.1", port, timedelta(seconds=0.5))
        assert 0.4 < time.monotonic() - started < 3
