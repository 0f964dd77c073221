"""Device keys, device IDs and the atomic, owner-only file writes that keep them safe.

A device is its EC P-256 key pair. Its ID is derived from the public key alone (Syncthing-style: base32 of
a SHA-256 prefix, grouped for reading aloud), so it is stable across restarts and different for every key.
Private keys are written with mode 0600 from the moment the file exists and replaced atomically, so a crash
never leaves a half-written or briefly world-readable key behind.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from cetd.errors import IdentityError
from cetd.ids import DeviceId

PRIVATE_FILE_MODE = 0o600
"""Mode of every file holding a secret: read and write for the owner only."""

_DEVICE_ID_BYTES = 20
_DEVICE_ID_GROUP = 8
_BASE32_ALPHABET = re.compile(r"^[A-Z2-7]{32}$")


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """Return a fresh EC P-256 private key (the curve every gRPC build accepts)."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialize ``key`` as unencrypted PKCS#8 PEM (the file's mode is what protects it)."""
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def public_key_der(public_key: PublicKeyTypes) -> bytes:
    """Return the DER SubjectPublicKeyInfo of ``public_key``, the bytes a device ID is hashed from."""
    return public_key.public_bytes(
        encoding=serialization.Encoding.DER,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def fsync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries to disk so that a rename inside it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path | str, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` so that readers see either the old or the new content, never a mix.

    The temporary file is created in the same directory with ``mode`` already set (never widened and
    narrowed later), written, fsynced, renamed over ``path``, and the directory is fsynced too.

    Args:
        path: the file to write; its directory must exist.
        data: the complete new content.
        mode: permission bits of the new file (the process umask may only narrow them).
    """
    target = Path(path)
    temporary = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temporary, flags, mode)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_directory(target.parent)


def write_private_key(path: Path | str, key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``key`` to ``path`` atomically with mode 0600."""
    write_file_atomic(path, private_key_pem(key), PRIVATE_FILE_MODE)


def check_private_file_mode(path: Path | str) -> None:
    """Raise `IdentityError` when anyone but the owner may read or write the secret file ``path``."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"private key {path} has mode {mode:04o} but must be 0600 (readable by its owner only); "
            f"if nobody else could have read it, run `chmod 600 {path}`"
        )


def load_private_key(path: Path | str, *, check_mode: bool = True) -> ec.EllipticCurvePrivateKey:
    """Load the EC P-256 private key stored at ``path``.

    Raises:
        IdentityError: the file is missing, unreadable, readable by others (when ``check_mode``),
            corrupt, or holds another kind of key.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"private key {path} is missing") from None
    except OSError as error:
        raise IdentityError(f"cannot read private key {path}: {error.strerror}") from None
    if check_mode:
        check_private_file_mode(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IdentityError(f"private key {path} is corrupt or not an unencrypted PEM key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise IdentityError(f"private key {path} is not an EC P-256 key")
    return key


def _group(compact: str) -> DeviceId:
    groups = [compact[i : i + _DEVICE_ID_GROUP] for i in range(0, len(compact), _DEVICE_ID_GROUP)]
    return DeviceId("-".join(groups))


def device_id_from_public_key(public_key: PublicKeyTypes) -> DeviceId:
    """Return the device ID of ``public_key``: base32 of the first 20 bytes of SHA-256 of its DER
    SubjectPublicKeyInfo, 32 characters in four groups of eight (``ABCDEFGH-IJKLMNOP-QRSTUVWX-YZ234567``)."""
    digest = hashlib.sha256(public_key_der(public_key)).digest()[:_DEVICE_ID_BYTES]
    return _group(base64.b32encode(digest).decode("ascii"))


def parse_device_id(text: str) -> DeviceId:
    """Normalize a device ID typed by a person (any case, dashes or spaces optional).

    Raises:
        IdentityError: ``text`` is not 32 base32 characters.
    """
    compact = re.sub(r"[\s-]", "", text).upper()
    if not _BASE32_ALPHABET.match(compact):
        raise IdentityError(
            f"{text!r} is not a device ID (expected 32 characters A-Z and 2-7, "
            "like ABCDEFGH-IJKLMNOP-QRSTUVWX-YZ234567)"
        )
    return _group(compact)


def short_id(device_id: str) -> str:
    """Return the first group of ``device_id``, enough to tell the devices of one household apart in logs."""
    return device_id.split("-", 1)[0]
