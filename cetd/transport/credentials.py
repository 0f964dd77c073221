"""TLS material for grpc: server and channel credentials and the options that pin a peer's identity.

Every member endpoint is mutual TLS against the household CA. A channel to a peer names the peer's
device ID as the TLS server name, so a certificate of another member cannot stand in for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import grpc

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""Largest single gRPC message accepted; tensors travel as ~1 MiB chunks, control messages are small."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsMaterial:
    """PEM bytes of one device's identity: what its servers present and its channels authenticate with."""

    key_pem: bytes
    """The device's private key (never logged)."""
    cert_chain_pem: bytes
    """The device certificate followed by the household CA certificate."""
    ca_pem: bytes
    """The household CA certificate: the only trust root."""


def mutual_tls_server_credentials(material: TlsMaterial) -> grpc.ServerCredentials:
    """Credentials for a member endpoint: clients must present a certificate issued by the household CA."""
    return grpc.ssl_server_credentials(
        [(material.key_pem, material.cert_chain_pem)],
        root_certificates=material.ca_pem,
        require_client_auth=True,
    )


def server_only_tls_credentials(material: TlsMaterial) -> grpc.ServerCredentials:
    """Credentials for the enrollment endpoint: encrypted and server-authenticated, no client certificate."""
    return grpc.ssl_server_credentials([(material.key_pem, material.cert_chain_pem)])


def mutual_tls_channel_credentials(material: TlsMaterial) -> grpc.ChannelCredentials:
    """Credentials for calling a member: trust only the household CA, present our own certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca_pem,
        private_key=material.key_pem,
        certificate_chain=material.cert_chain_pem,
    )


def channel_options(tls_server_name: str, *, keepalive: timedelta = timedelta(seconds=10)) -> list[tuple[str, object]]:
    """grpc channel options that pin the peer's identity and bound message sizes.

    Args:
        tls_server_name: the name in the peer's certificate (derived from its device ID).
        keepalive: HTTP/2 ping interval, so that a cut link is noticed by streams too.
    """
    return [
        ("grpc.ssl_target_name_override", tls_server_name),
        ("grpc.default_authority", tls_server_name),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", int(keepalive.total_seconds() * 1000)),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options() -> list[tuple[str, object]]:
    """grpc server options: bounded messages, and tolerate the client keepalive pings above."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]
