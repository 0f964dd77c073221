"""Logging set-up: one line per record with the device ID, journald-friendly, or JSON for machines.

Under systemd ($JOURNAL_STREAM set) stderr goes to journald, which stamps time and unit itself, so
records carry a syslog priority prefix (``<4>``) instead of a timestamp.
"""

from __future__ import annotations

import json
import logging
import os
import sys

_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class _DeviceFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.device = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.device = self.device
        return True


_device_filter = _DeviceFilter()


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": record.created,
            "level": record.levelname.lower(),
            "device": getattr(record, "device", "-"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", *, json_output: bool = False) -> None:
    """Configure the root logger once for the daemon process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_device_filter)
    if json_output:
        handler.setFormatter(_JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("[%(device)s] %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s [%(device)s] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and zeroconf are chatty at debug level; our own records are what operators need.
    for noisy in ("zeroconf", "grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def set_log_device(device_id: str) -> None:
    """Stamp every later record with this daemon's (short) device ID."""
    _device_filter.device = device_id
