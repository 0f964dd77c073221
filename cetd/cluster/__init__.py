"""Cluster coordination as pure logic: membership and failure detection, election, jobs, planning.

Nothing in this package touches a socket, a clock or torch; the daemon feeds it heartbeats, claims
and the current time, and the tests drive it in memory.
"""

from __future__ import annotations

from cetd.cluster.election import Candidate, Claim, Election, ElectionConfig, Role
from cetd.cluster.membership import FailureDetectorConfig, MembershipTable, PeerRecord, PeerState

__all__ = [
    "Candidate",
    "Claim",
    "Election",
    "ElectionConfig",
    "FailureDetectorConfig",
    "MembershipTable",
    "PeerRecord",
    "PeerState",
    "Role",
]
