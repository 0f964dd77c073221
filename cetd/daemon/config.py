"""The daemon's configuration: typed, frozen sections loaded from one TOML file.

The file (default ``/etc/cetd/cetd.toml``) has one table per section below; every key is optional and
a missing key takes the default documented under its field. Durations are written in seconds under
keys ending in ``_s`` and become `timedelta`s here. Unknown sections and keys are errors, not silently
ignored, because a misspelt ``heartbeat_interval_s`` would otherwise leave a household running on
defaults nobody chose. Values that mean "work it out" (a name, a rank, a memory size) are stored as
written (``""`` or ``0``); the code that can probe the machine resolves them.

`render_default_config` produces the commented file shipped as ``systemd/cetd.toml``; its comments are
the first sentence of each field's docstring, so the file and the code cannot drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import ipaddress
import os
import re
import socket
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from cetd.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 (Jetson) only
    import tomli as tomllib

DEFAULT_CONFIG_PATH: Final = Path("/etc/cetd/cetd.toml")
"""Where the daemon looks when ``--config`` is not given; the systemd unit passes it explicitly."""

LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
_PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def _is_host(text: str) -> bool:
    """True for an IPv4/IPv6 literal or a syntactically valid DNS host name."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return bool(_HOST_NAME.match(text))
    return True


def _check_port(section: str, key: str, value: int, *, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        zero = " (0 picks any free port)" if allow_zero else ""
        raise ConfigError(f"[{section}] {key} must be between {low} and 65535{zero}, got {value}.")


def _check_positive(section: str, key: str, value: timedelta) -> None:
    if value <= timedelta(0):
        raise ConfigError(f"[{section}] {key} must be a positive number of seconds, got {value.total_seconds()}.")


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` or ``"[v6addr]:port"`` into host and port.

    Raises:
        ValueError: the text is not a host followed by a port between 1 and 65535.
    """
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not of the form [address]:port")
        ipaddress.IPv6Address(host)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r} is not of the form host:port")
        if not _is_host(host):
            raise ValueError(f"{host!r} is not a host name or address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{port_text!r} is not a port between 1 and 65535")
    return host, int(port_text)


@dataclass(kw_only=True, slots=True, frozen=True)
class DaemonConfig:
    """[daemon]: who this device is, where it keeps its state and where it listens."""

    name: str = ""
    """Name shown to the household in `cetctl peers`; empty means this machine's hostname."""
    state_dir: Path = Path("/var/lib/cetd")
    """Directory holding the device key, certificates, member list and checkpoints (mode 0700)."""
    listen_host: str = "0.0.0.0"
    """Address the gRPC servers bind to; 0.0.0.0 means every IPv4 interface."""
    port: int = 7770
    """Port of the mutual-TLS gRPC server that members and clients use; 0 picks any free port."""
    enroll_port: int = 7771
    """Port of the server-TLS-only server where new devices ask to join; 0 picks any free port."""
    advertise_host: str = ""
    """Address announced to peers over mDNS; empty means the addresses of the announcing interfaces."""
    log_level: str = "info"
    """Lowest log level written: debug, info, warning, error or critical."""
    log_json: bool = False
    """Write one JSON object per log record instead of human-readable lines."""

    def __post_init__(self) -> None:
        if len(self.name) > 63 or not self.name.isprintable():
            raise ConfigError(f"[daemon] name must be at most 63 printable characters, got {self.name!r}.")
        if not self.state_dir.is_absolute():
            raise ConfigError(f"[daemon] state_dir must be an absolute path, got '{self.state_dir}'.")
        if not _is_host(self.listen_host):
            raise ConfigError(f"[daemon] listen_host must be an IP address or host name, got {self.listen_host!r}.")
        _check_port("daemon", "port", self.port, allow_zero=True)
        _check_port("daemon", "enroll_port", self.enroll_port, allow_zero=True)
        if self.port != 0 and self.port == self.enroll_port:
            raise ConfigError(f"[daemon] port and enroll_port must differ, both are {self.port}.")
        if self.advertise_host and not _is_host(self.advertise_host):
            raise ConfigError(
                f"[daemon] advertise_host must be empty, an IP address or a host name, got {self.advertise_host!r}."
            )
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"[daemon] log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}.")

    @property
    def device_name(self) -> str:
        """`name`, or this machine's hostname when `name` is empty."""
        return self.name or socket.gethostname()


@dataclass(kw_only=True, slots=True, frozen=True)
class DiscoveryConfig:
    """[discovery]: how this daemon finds the other devices of the household."""

    mdns: bool = True
    """Announce and browse `_cetd._tcp.local.` with mDNS on the local network."""
    interfaces: tuple[str, ...] = ()
    """Interface names or addresses that mDNS uses; empty means all of them."""
    static_peers: tuple[str, ...] = ()
    """Peers to contact without mDNS, as "host:port" (e.g. "10.0.0.5:7770" or "[fe80::1]:7770")."""

    def __post_init__(self) -> None:
        for interface in self.interfaces:
            if not interface or not interface.isprintable() or interface != interface.strip():
                raise ConfigError(f"[discovery] interfaces contains an invalid entry {interface!r}.")
        for peer in self.static_peers:
            try:
                parse_host_port(peer)
            except ValueError as error:
                raise ConfigError(f"[discovery] static_peers entry {peer!r} is invalid: {error}.") from None

    @property
    def static_peer_addresses(self) -> tuple[tuple[str, int], ...]:
        """`static_peers` split into (host, port) pairs."""
        return tuple(parse_host_port(peer) for peer in self.static_peers)


@dataclass(kw_only=True, slots=True, frozen=True)
class MembershipConfig:
    """[membership]: heartbeats and how quickly a silent peer is declared suspect, then dead."""

    heartbeat_interval: timedelta = timedelta(seconds=0.5)
    """Seconds between heartbeats sent to every peer."""
    suspect_after: timedelta = timedelta(seconds=1.5)
    """Seconds of silence after which a peer is suspected; must exceed the heartbeat interval."""
    dead_after: timedelta = timedelta(seconds=3.0)
    """Seconds of silence after which a peer is declared dead; must exceed suspect_after_s."""
    startup_grace: timedelta = timedelta(seconds=1.5)
    """Seconds after start during which no peer is declared dead, so a restart does not cause churn."""

    def __post_init__(self) -> None:
        for key, value in (
            ("heartbeat_interval_s", self.heartbeat_interval),
            ("suspect_after_s", self.suspect_after),
            ("dead_after_s", self.dead_after),
        ):
            _check_positive("membership", key, value)
        if self.startup_grace < timedelta(0):
            raise ConfigError(
                f"[membership] startup_grace_s must not be negative, got {self.startup_grace.total_seconds()}."
            )
        if self.suspect_after <= self.heartbeat_interval:
            raise ConfigError(
                "[membership] suspect_after_s must be longer than heartbeat_interval_s "
                f"({self.suspect_after.total_seconds()} <= {self.heartbeat_interval.total_seconds()})."
            )
        if self.dead_after <= self.suspect_after:
            raise ConfigError(
                "[membership] dead_after_s must be longer than suspect_after_s "
                f"({self.dead_after.total_seconds()} <= {self.suspect_after.total_seconds()})."
            )


@dataclass(kw_only=True, slots=True, frozen=True)
class JoinConfig:
    """[join]: how a fresh device without an identity becomes a member."""

    token: str = ""
    """A one-time invite from `cetctl invite`; set before first boot, the device joins by itself."""
    owner_approval: bool = True
    """Without identity or token, file a pending request for `cetctl devices approve`."""

    def __post_init__(self) -> None:
        if any(character.isspace() or not character.isprintable() for character in self.token):
            raise ConfigError("[join] token must not contain spaces or control characters.")


@dataclass(kw_only=True, slots=True, frozen=True)
class DeviceConfig:
    """[device]: what this device offers to the household."""

    rank: int = 0
    """Capability rank used by the election; 0 derives it from cores, memory and accelerator."""
    memory_limit_bytes: int = 0
    """Memory the training workers may use, in bytes; 0 means the physical memory. A cgroup limit on the
    daemon (systemd MemoryMax=, a container's) lowers it further, and a plan only uses what is free
    when it is made."""
    power_profile: str = "auto"
    """Power profile for the energy model (e.g. "jetson-nano"); "auto" picks one from the hardware."""
    profile: bool = True
    """Measure this device's speed in the background (a few seconds, daily, only while no job runs)."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"[device] rank must not be negative (0 means automatic), got {self.rank}.")
        if self.memory_limit_bytes < 0:
            raise ConfigError(
                f"[device] memory_limit_bytes must not be negative (0 means physical memory), "
                f"got {self.memory_limit_bytes}."
            )
        if not _PROFILE_NAME.match(self.power_profile):
            raise ConfigError(
                "[device] power_profile must be a lowercase name of letters, digits, '-', '_' or '.', "
                f"got {self.power_profile!r}."
            )


@dataclass(kw_only=True, slots=True, frozen=True)
class TrainingConfig:
    """[training]: resources of the training worker processes on this device."""

    worker_threads: int = 0
    """Torch threads per worker process; 0 means one per CPU core."""
    checkpoint_dir: Path | None = None
    """Directory for checkpoint shards; empty means the checkpoints folder in state_dir."""

    def __post_init__(self) -> None:
        if not 0 <= self.worker_threads <= 4096:
            raise ConfigError(
                f"[training] worker_threads must be between 0 (all cores) and 4096, got {self.worker_threads}."
            )
        if self.checkpoint_dir is not None and not self.checkpoint_dir.is_absolute():
            raise ConfigError(f"[training] checkpoint_dir must be an absolute path, got '{self.checkpoint_dir}'.")


@dataclass(kw_only=True, slots=True, frozen=True)
class Config:
    """The whole configuration, one attribute per TOML table."""

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    """[daemon] table."""
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    """[discovery] table."""
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    """[membership] table."""
    join: JoinConfig = field(default_factory=JoinConfig)
    """[join] table."""
    device: DeviceConfig = field(default_factory=DeviceConfig)
    """[device] table."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """[training] table."""

    @property
    def checkpoint_path(self) -> Path:
        """Where checkpoints go: `training.checkpoint_dir`, else ``state_dir/checkpoints``."""
        return self.training.checkpoint_dir or self.daemon.state_dir / "checkpoints"

    def with_overrides(self, overrides: Mapping[str, object]) -> Config:
        """Return a copy with ``"section.key"`` values replaced, checked like values from the file.

        Keys are the TOML keys (``"daemon.port"``, ``"membership.dead_after_s"``); values may be TOML
        values or their Python forms (`Path`, `timedelta`). Command-line flags such as ``--port`` use
        this, so a bad flag gets the same one-line error as a bad file.

        Raises:
            ConfigError: an unknown key or an invalid value.
        """
        tables = to_toml_dict(self)
        _apply_overrides(tables, overrides)
        return _build_config(tables)


_SECTIONS: Final[Mapping[str, type[Any]]] = {
    section.name: typing.get_type_hints(Config)[section.name] for section in dataclasses.fields(Config)
}


def _toml_key(section_class: type[Any], field_name: str) -> str:
    return f"{field_name}_s" if typing.get_type_hints(section_class)[field_name] is timedelta else field_name


def _section_keys(section_class: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    """TOML key → dataclass field of one section."""
    return {_toml_key(section_class, item.name): item for item in dataclasses.fields(section_class)}


def _convert(section: str, key: str, hint: object, value: object) -> object:
    """Check a TOML value's type and turn it into the field's Python type."""
    where = f"[{section}] {key}"
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number, got {value!r}.")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}.")
        return value
    if hint is timedelta:
        if isinstance(value, timedelta):
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ConfigError(f"{where} must be a number of seconds, got {value!r}.")
        try:
            return timedelta(seconds=value)
        except OverflowError:
            raise ConfigError(f"{where} is too large, got {value!r}.") from None
    if hint is Path or hint == Path | None:
        if not isinstance(value, str | os.PathLike):
            raise ConfigError(f"{where} must be a path string, got {value!r}.")
        text = os.fspath(value)
        if not isinstance(text, str):
            raise ConfigError(f"{where} must be a path string, got {value!r}.")
        if text == "" and hint != Path:
            return None
        if text == "":
            raise ConfigError(f"{where} must not be empty.")
        return Path(text)
    if hint == tuple[str, ...]:
        if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}.")
        return tuple(value)
    raise AssertionError(f"no TOML conversion for {where} of type {hint}")  # a new field type needs one


def _build_section(section: str, raw: object) -> object:
    section_class = _SECTIONS[section]
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table, got {raw!r}.")
    keys = _section_keys(section_class)
    hints = typing.get_type_hints(section_class)
    arguments: dict[str, object] = {}
    for key, value in raw.items():
        if key not in keys:
            raise ConfigError(f"unknown key '{key}' in [{section}]; known keys: {', '.join(keys)}.")
        name = keys[key].name
        arguments[name] = _convert(section, key, hints[name], value)
    section_object: object = section_class(**arguments)
    return section_object


def _build_config(tables: Mapping[str, object]) -> Config:
    for name in tables:
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section [{name}]; known sections: {', '.join(_SECTIONS)}.")
    sections = {name: _build_section(name, raw) for name, raw in tables.items()}
    return Config(**sections)  # type: ignore[arg-type]  # each value was built by its own section class


def _apply_overrides(tables: dict[str, Any], overrides: Mapping[str, object]) -> None:
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in _SECTIONS or not key:
            raise ConfigError(f"unknown setting '{dotted}'; settings are named like 'daemon.port'.")
        if key not in _section_keys(_SECTIONS[section]):
            raise ConfigError(f"unknown key '{key}' in [{section}].")
        tables.setdefault(section, {})[key] = value


def load_config(path: Path | None = None, overrides: Mapping[str, object] | None = None) -> Config:
    """Read the configuration file and apply command-line overrides.

    Args:
        path: the TOML file; None means `DEFAULT_CONFIG_PATH`, which may be absent (all defaults).
            An explicitly given file must exist.
        overrides: ``{"section.key": value}`` applied after the file, as in `Config.with_overrides`.

    Returns:
        The checked configuration.

    Raises:
        ConfigError: the file is missing (when given), unreadable, not TOML, or holds an unknown
            section, unknown key or invalid value.
    """
    explicit = path is not None
    file_path = path if path is not None else DEFAULT_CONFIG_PATH
    tables: dict[str, Any]
    try:
        with file_path.open("rb") as stream:
            tables = tomllib.load(stream)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"configuration file '{file_path}' does not exist.") from None
        tables = {}
    except OSError as error:
        raise ConfigError(f"cannot read configuration file '{file_path}': {error.strerror or error}.") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"configuration file '{file_path}' is not valid TOML: {error}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"configuration file '{file_path}' is not UTF-8 text.") from None
    for name, value in tables.items():
        if name not in _SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"unknown key '{name}' at the top of '{file_path}'; keys belong in a [section].")
    _apply_overrides(tables, overrides or {})
    return _build_config(tables)


def _toml_value(value: object) -> object:
    """A field's Python value in its TOML form (seconds, strings, lists)."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Path):
        return str(value)
    if value is None:
        return ""
    if isinstance(value, tuple):
        return list(value)
    return value


def to_toml_dict(config: Config) -> dict[str, dict[str, object]]:
    """Every section and key of `config` as TOML-typed values, keyed like the file."""
    tables: dict[str, dict[str, object]] = {}
    for section in dataclasses.fields(Config):
        section_object = getattr(config, section.name)
        tables[section.name] = {
            _toml_key(type(section_object), item.name): _toml_value(getattr(section_object, item.name))
            for item in dataclasses.fields(section_object)
        }
    return tables


def _escape_toml_string(text: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    parts = []
    for character in text:
        if character in escapes:
            parts.append(escapes[character])
        elif ord(character) < 0x20 or ord(character) == 0x7F:
            parts.append(f"\\u{ord(character):04x}")
        else:
            parts.append(character)
    return '"' + "".join(parts) + '"'


def _format_toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _escape_toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_format_toml(item) for item in value) + "]"
    raise AssertionError(f"cannot write {value!r} as TOML")  # to_toml_dict only yields the types above


@functools.cache
def _field_docs() -> Mapping[tuple[str, str], str]:
    """(class name, field name) → first sentence of the docstring under that field, read from this source."""
    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    docs: dict[tuple[str, str], str] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for statement, following in zip(node.body, node.body[1:], strict=False):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.name, statement.target.id] = " ".join(following.value.value.split())
    return types.MappingProxyType(docs)


_HEADER: Final = """\
# cetd configuration (TOML). The daemon reads /etc/cetd/cetd.toml unless `cetd run --config PATH`.
# Every key is shown commented out with its default; uncomment a line to change it.
# Durations are in seconds (keys ending in _s). Unknown sections or keys stop the daemon with an error.
"""


def render_config(config: Config, *, commented: bool = False) -> str:
    """Write `config` as TOML with each key's documentation above it.

    Args:
        config: the values to write.
        commented: write the keys as comments (``#key = value``), as in the shipped default file.
    """
    docs = _field_docs()
    prefix = "#" if commented else ""
    lines = [_HEADER.rstrip("\n")] if commented else []
    for section_name, values in to_toml_dict(config).items():
        section_object = getattr(config, section_name)
        summary = (inspect.getdoc(type(section_object)) or "").splitlines()[0].removeprefix(f"[{section_name}]: ")
        lines += ["", f"# {summary[:1].upper()}{summary[1:]}", f"[{section_name}]"]
        for item, (key, value) in zip(dataclasses.fields(section_object), values.items(), strict=True):
            lines.append(f"# {docs[type(section_object).__name__, item.name]}")
            lines.append(f"{prefix}{key} = {_format_toml(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def render_default_config() -> str:
    """The fully commented default file, identical to ``systemd/cetd.toml`` in the source tree."""
    return render_config(Config(), commented=True)
