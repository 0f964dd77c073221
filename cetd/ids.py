"""Identifier types shared by every layer.

`NewType`s cost nothing at run time and keep a device ID from being passed where a job ID is meant.
This module imports nothing from cetd, so every layer may use it.
"""

from __future__ import annotations

from typing import NewType

DeviceId = NewType("DeviceId", str)
"""Base32 of the SHA-256 of a device's public key, grouped like Syncthing's (e.g. ``ABCDEFG-HIJKLMN``)."""

HouseholdId = NewType("HouseholdId", str)
"""Hex digest derived from the household CA certificate; never the household's name."""

JobId = NewType("JobId", str)
Term = NewType("Term", int)
Step = NewType("Step", int)

PROTOCOL_VERSION = 1
"""Wire protocol version, advertised in mDNS TXT and checked on every heartbeat."""
