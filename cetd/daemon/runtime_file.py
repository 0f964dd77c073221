"""``runtime.json``: what a running daemon publishes in its state directory for local clients and tests."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cetd.errors import CetdError, UnavailableError

RUNTIME_FILE = "runtime.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonRuntime:
    """Where the daemon of one state directory listens right now."""

    device_id: str
    address: str
    """host:port that clients on this machine use (loopback when listening on all interfaces)."""
    port: int
    enroll_port: int
    pid: int

    @staticmethod
    def read(state_dir: Path) -> DaemonRuntime:
        path = state_dir / RUNTIME_FILE
        try:
            return DaemonRuntime(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise UnavailableError(f"no daemon is running on state directory {state_dir}") from None
        except (ValueError, TypeError) as error:
            raise CetdError(f"{path} is unreadable: {error}") from None

    def write(self, state_dir: Path) -> None:
        """Write atomically, so a reader never sees half a file."""
        tmp = state_dir / (RUNTIME_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(state_dir / RUNTIME_FILE)
