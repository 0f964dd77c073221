"""Tests for cetd.daemon.config: loading, checking, overriding and rendering the TOML configuration."""

from __future__ import annotations

import dataclasses
import socket
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from cetd.daemon import config as config_module
from cetd.daemon.config import (
    Config,
    DaemonConfig,
    DiscoveryConfig,
    MembershipConfig,
    TrainingConfig,
    load_config,
    parse_host_port,
    render_config,
    render_default_config,
    to_toml_dict,
)
from cetd.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]

FULL_FILE = """
[daemon]
name = "kitchen-pi"
state_dir = "/srv/cetd"
listen_host = "10.0.0.7"
port = 9000
enroll_port = 9001
advertise_host = "kitchen.local"
log_level = "debug"
log_json = true

[discovery]
mdns = false
interfaces = ["eth0", "127.0.0.1"]
static_peers = ["10.0.0.5:7770", "[fe80::1]:7771", "laptop.lan:7000"]

[membership]
heartbeat_interval_s = 0.25
suspect_after_s = 1
dead_after_s = 2.5
startup_grace_s = 0

[join]
token = "CETD1-abc.def"
owner_approval = false

[device]
rank = 42
memory_limit_bytes = 4_000_000_000
power_profile = "jetson-nano"

[training]
worker_threads = 3
checkpoint_dir = "/mnt/ssd/ckpt"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cetd.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.timeout(10)
def test_missing_default_file_means_all_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    config = load_config(None)
    assert config == Config()
    assert config.daemon.port == 7770
    assert config.daemon.enroll_port == 7771
    assert config.daemon.state_dir == Path("/var/lib/cetd")
    assert config.membership.heartbeat_interval == timedelta(milliseconds=500)
    assert config.membership.dead_after == timedelta(seconds=3)
    assert config.join.owner_approval is True
    assert config.discovery.interfaces == ()


@pytest.mark.timeout(10)
def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"'.*nope\.toml' does not exist") as caught:
        load_config(missing)
    assert caught.value.exit_code == 78


@pytest.mark.timeout(10)
def test_full_file_sets_every_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_FILE))
    assert config.daemon == DaemonConfig(
        name="kitchen-pi",
        state_dir=Path("/srv/cetd"),
        listen_host="10.0.0.7",
        port=9000,
        enroll_port=9001,
        advertise_host="kitchen.local",
        log_level="debug",
        log_json=True,
    )
    assert config.discovery == DiscoveryConfig(
        mdns=False,
        interfaces=("eth0", "127.0.0.1"),
        static_peers=("10.0.0.5:7770", "[fe80::1]:7771", "laptop.lan:7000"),
    )
    assert config.discovery.static_peer_addresses == (
        ("10.0.0.5", 7770),
        ("fe80::1", 7771),
        ("laptop.lan", 7000),
    )
    assert config.membership == MembershipConfig(
        heartbeat_interval=timedelta(milliseconds=250),
        suspect_after=timedelta(seconds=1),
        dead_after=timedelta(milliseconds=2500),
        startup_grace=timedelta(0),
    )
    assert config.join.token == "CETD1-abc.def"
    assert config.join.owner_approval is False
    assert config.device.rank == 42
    assert config.device.memory_limit_bytes == 4_000_000_000
    assert config.device.power_profile == "jetson-nano"
    assert config.training == TrainingConfig(worker_threads=3, checkpoint_dir=Path("/mnt/ssd/ckpt"))
    assert config.checkpoint_path == Path("/mnt/ssd/ckpt")


@pytest.mark.timeout(10)
def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[daemon]\nport = 0\n[membership]\ndead_after_s = 10\n"))
    assert config.daemon.port == 0
    assert config.daemon.enroll_port == 7771
    assert config.membership.dead_after == timedelta(seconds=10)
    assert config.membership.suspect_after == timedelta(seconds=1.5)
    assert config.training == TrainingConfig()


@pytest.mark.timeout(10)
def test_resolved_auto_values() -> None:
    assert Config().daemon.device_name == socket.gethostname()
    assert DaemonConfig(name="attic").device_name == "attic"
    assert Config().checkpoint_path == Path("/var/lib/cetd/checkpoints")
    assert Config(daemon=DaemonConfig(state_dir=Path("/x"))).checkpoint_path == Path("/x/checkpoints")


@pytest.mark.timeout(10)
def test_sections_are_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.daemon.port = 1  # type: ignore[misc]  # assigning a frozen field is what this test checks


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[daemon]\nprot = 1\n", r"^unknown key 'prot' in \[daemon\]"),
        ("[membership]\nheartbeat_interval = 1\n", r"^unknown key 'heartbeat_interval' in \[membership\]"),
        ("[deamon]\nport = 1\n", r"^unknown section \[deamon\]"),
        ("port = 1\n", r"^unknown key 'port' at the top"),
        ("daemon = 3\n", r"^\[daemon\] must be a table"),
        ('[daemon]\nport = "7770"\n', r"^\[daemon\] port must be a whole number"),
        ("[daemon]\nport = true\n", r"^\[daemon\] port must be a whole number"),
        ("[daemon]\nport = 70000\n", r"^\[daemon\] port must be between 0 and 65535"),
        ("[daemon]\nport = 7000\nenroll_port = 7000\n", r"^\[daemon\] port and enroll_port must differ"),
        ("[daemon]\nlog_json = 1\n", r"^\[daemon\] log_json must be true or false"),
        ('[daemon]\nlog_level = "verbose"\n', r"^\[daemon\] log_level must be one of debug, info"),
        ('[daemon]\nstate_dir = "var/lib"\n', r"^\[daemon\] state_dir must be an absolute path"),
        ('[daemon]\nstate_dir = ""\n', r"^\[daemon\] state_dir must not be empty"),
        ('[daemon]\nlisten_host = "not a host"\n', r"^\[daemon\] listen_host must be"),
        ('[daemon]\nadvertise_host = "a_b"\n', r"^\[daemon\] advertise_host must be"),
        ('[daemon]\nname = "tab\\there"\n', r"^\[daemon\] name must be at most 63 printable"),
        ('[discovery]\ninterfaces = "eth0"\n', r"^\[discovery\] interfaces must be a list of strings"),
        ('[discovery]\nstatic_peers = ["10.0.0.5"]\n', r"^\[discovery\] static_peers entry '10.0.0.5'"),
        ('[discovery]\nstatic_peers = ["h:0"]\n', r"^\[discovery\] static_peers entry 'h:0'"),
        (
            '[membership]\nheartbeat_interval_s = "fast"\n',
            r"^\[membership\] heartbeat_interval_s must be a number",
        ),
        (
            "[membership]\nheartbeat_interval_s = true\n",
            r"^\[membership\] heartbeat_interval_s must be a number",
        ),
        (
            "[membership]\nheartbeat_interval_s = nan\n",
            r"^\[membership\] heartbeat_interval_s must be a number",
        ),
        (
            "[membership]\nheartbeat_interval_s = 0\n",
            r"^\[membership\] heartbeat_interval_s must be a positive",
        ),
        ("[membership]\nsuspect_after_s = 0.5\n", r"^\[membership\] suspect_after_s must be longer than"),
        ("[membership]\ndead_after_s = 1.5\n", r"^\[membership\] dead_after_s must be longer than suspect"),
        ("[membership]\nstartup_grace_s = -1\n", r"^\[membership\] startup_grace_s must not be negative"),
        ("[membership]\ndead_after_s = 1e300\n", r"^\[membership\] dead_after_s is too large"),
        ('[join]\ntoken = "abc def"\n', r"^\[join\] token must not contain spaces"),
        ("[device]\nrank = -1\n", r"^\[device\] rank must not be negative"),
        ("[device]\nmemory_limit_bytes = -5\n", r"^\[device\] memory_limit_bytes must not be negative"),
        ('[device]\npower_profile = "Jetson Nano"\n', r"^\[device\] power_profile must be a lowercase name"),
        ("[training]\nworker_threads = -2\n", r"^\[training\] worker_threads must be between 0"),
        ('[training]\ncheckpoint_dir = "ckpt"\n', r"^\[training\] checkpoint_dir must be an absolute path"),
        ("[daemon\n", r"is not valid TOML"),
    ],
)
def test_invalid_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(write(tmp_path, text))
    assert "\n" not in str(caught.value)


@pytest.mark.timeout(10)
def test_unknown_key_message_lists_known_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "[join]\ntokn = 'x'\n"))
    assert str(caught.value) == "unknown key 'tokn' in [join]; known keys: token, owner_approval."


@pytest.mark.timeout(10)
def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "cetd.toml"
    path.write_bytes(b'[daemon]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match="not"):
        load_config(path)


@pytest.mark.timeout(10)
def test_unreadable_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_config(tmp_path)  # a directory, not a file


@pytest.mark.timeout(10)
def test_overrides_apply_after_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nport = 9000\nstate_dir = '/srv/cetd'\n")
    config = load_config(
        path,
        {
            "daemon.port": 0,
            "daemon.state_dir": tmp_path / "state",
            "membership.heartbeat_interval_s": timedelta(milliseconds=100),
            "discovery.interfaces": ["127.0.0.1"],
        },
    )
    assert config.daemon.port == 0
    assert config.daemon.state_dir == tmp_path / "state"
    assert config.membership.heartbeat_interval == timedelta(milliseconds=100)
    assert config.discovery.interfaces == ("127.0.0.1",)


@pytest.mark.timeout(10)
def test_with_overrides_checks_like_the_file() -> None:
    base = Config()
    changed = base.with_overrides({"daemon.enroll_port": 0, "training.checkpoint_dir": "/tmp/ck"})
    assert changed.daemon.enroll_port == 0
    assert changed.checkpoint_path == Path("/tmp/ck")
    assert base.daemon.enroll_port == 7771  # the original is untouched
    assert changed.with_overrides({"training.checkpoint_dir": ""}).training.checkpoint_dir is None
    with pytest.raises(ConfigError, match=r"^unknown key 'portt' in \[daemon\]"):
        base.with_overrides({"daemon.portt": 1})
    with pytest.raises(ConfigError, match=r"^unknown setting 'port'"):
        base.with_overrides({"port": 1})
    with pytest.raises(ConfigError, match=r"^unknown setting 'network.port'"):
        base.with_overrides({"network.port": 1})
    with pytest.raises(ConfigError, match=r"^\[daemon\] port must be a whole number"):
        base.with_overrides({"daemon.port": "80"})
    with pytest.raises(ConfigError, match=r"^\[membership\] dead_after_s must be longer"):
        base.with_overrides({"membership.dead_after_s": 1})


@pytest.mark.timeout(10)
def test_direct_construction_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"^\[membership\] dead_after_s must be longer than suspect_after_s"):
        MembershipConfig(dead_after=timedelta(seconds=1))
    with pytest.raises(
        ConfigError,
        match=r"^\[daemon\] port must be between 0 and 65535 \(0 picks any free port\), got -1\.$",
    ):
        DaemonConfig(port=-1)


@pytest.mark.timeout(10)
def test_parse_host_port() -> None:
    assert parse_host_port("127.0.0.1:7770") == ("127.0.0.1", 7770)
    assert parse_host_port("[::1]:1") == ("::1", 1)
    assert parse_host_port("node-3.local:65535") == ("node-3.local", 65535)
    for bad in ("::1:7770", "[::1]7770", "host", "host:", "host:65536", ":80", "[zz]:80", "a b:1"):
        with pytest.raises(ValueError, match=r"\w"):
            parse_host_port(bad)


@pytest.mark.timeout(10)
def test_shipped_example_is_the_rendered_default() -> None:
    shipped = (REPO_ROOT / "systemd" / "cetd.toml").read_text(encoding="utf-8")
    assert shipped == render_default_config()


@pytest.mark.timeout(10)
def test_rendered_default_documents_every_key_and_loads_as_defaults(tmp_path: Path) -> None:
    text = render_default_config()
    parsed = tomllib.loads(text)
    assert parsed == {name: {} for name in to_toml_dict(Config())}  # every key is commented out
    assert load_config(write(tmp_path, text)) == Config()

    lines = text.splitlines()
    uncommented = "\n".join(line[1:] if line.startswith("#") and " = " in line else line for line in lines)
    assert tomllib.loads(uncommented) == to_toml_dict(Config())
    assert load_config(write(tmp_path, uncommented)) == Config()
    for section, keys in to_toml_dict(Config()).items():
        assert f"[{section}]" in lines
        for key in keys:
            index = next(i for i, line in enumerate(lines) if line.startswith(f"#{key} = "))
            doc = lines[index - 1]
            assert doc.startswith("# "), f"{key} has no documentation line"
            assert len(doc) > 20, f"{key} has a too short documentation line"
    assert "#heartbeat_interval_s = 0.5" in lines
    assert '#state_dir = "/var/lib/cetd"' in lines
    assert "#static_peers = []" in lines


@pytest.mark.timeout(10)
def test_render_round_trips_a_non_default_config(tmp_path: Path) -> None:
    original = load_config(write(tmp_path, FULL_FILE)).with_overrides(
        {"join.token": 'q"uo\\te', "daemon.name": "kökken-π"}
    )
    text = render_config(original)
    assert load_config(write(tmp_path, text)) == original
    assert 'token = "q\\"uo\\\\te"' in text.splitlines()
