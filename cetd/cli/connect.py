"""How a command-line client finds and authenticates to a daemon.

A client on a member device uses that device's identity from the state directory (root-only files)
and the address the daemon wrote to ``runtime.json`` when it started. ``--address`` reaches another
member: its device ID is read from the certificate it presents, and mutual TLS against the household
CA still decides whether to trust it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from cetd.daemon.runtime_file import DaemonRuntime
from cetd.errors import UnavailableError
from cetd.identity import (
    StateDir,
    device_id_from_certificate,
    fetch_peer_chain,
    load_identity,
    tls_server_name,
)
from cetd.transport.credentials import TlsMaterial
from cetd.transport.household_client import PeerClient


def open_client(state_dir: Path, address: str | None = None) -> PeerClient:
    """A client of the local daemon (or of the member at ``address``) with this device's identity."""
    identity = load_identity(StateDir(state_dir))
    material = TlsMaterial(key_pem=identity.key_pem, cert_chain_pem=identity.cert_chain_pem, ca_pem=identity.ca_pem)
    if address is None:
        runtime = DaemonRuntime.read(state_dir)
        return PeerClient(runtime.address, tls_server_name(identity.device_id), material)
    host, _, port = address.rpartition(":")
    try:
        chain = fetch_peer_chain(host, int(port), timedelta(seconds=3))
    except (OSError, ValueError) as error:
        raise UnavailableError(f"cannot reach {address}: {error}") from None
    return PeerClient(address, tls_server_name(device_id_from_certificate(chain[0])), material)
