"""Heartbeats and `cetctl peers` views through their wire messages: the links travel, bad readings do not."""

from __future__ import annotations

import math

from cetd.ids import DeviceId, Term
from cetd.transport.household_codec import (
    heartbeat_from_request,
    heartbeat_from_response,
    heartbeat_to_request,
    heartbeat_to_response,
    view_from_wire,
    view_to_wire,
)
from cetd.transport.peer_info import Capabilities, Heartbeat, HouseholdView, MeasuredLink, PairLink, PeerInfo
from cetd.wire import household_pb2 as pb

SENDER = PeerInfo(device_id=DeviceId("AAAA"), name="a", address="127.0.0.1:7770",
                  capabilities=Capabilities(cores=2, memory_bytes=4 << 30, free_memory_bytes=3 << 30))
LINKS = (MeasuredLink(peer_id=DeviceId("BBBB"), bandwidth_bytes_per_second=110e6, latency_seconds=0.4e-3),
         MeasuredLink(peer_id=DeviceId("CCCC"), bandwidth_bytes_per_second=12e6, latency_seconds=3e-3))


def test_a_heartbeat_carries_its_senders_links_and_free_memory_both_ways() -> None:
    beat = Heartbeat(sender=SENDER, term=Term(3), coordinator_id=DeviceId("AAAA"), roster_version=2, links=LINKS)
    assert heartbeat_from_request(pb.HeartbeatRequest.FromString(
        heartbeat_to_request(beat, 1).SerializeToString())) == beat
    assert heartbeat_from_response(pb.HeartbeatResponse.FromString(
        heartbeat_to_response(beat).SerializeToString())) == beat


def test_readings_no_probe_could_have_made_are_dropped() -> None:
    request = heartbeat_to_request(Heartbeat(sender=SENDER, term=Term(1), coordinator_id=None, roster_version=1,
                                             links=LINKS), 1)
    for peer, bandwidth, latency in [("", 1e6, 0.0), ("DDDD", 0.0, 1e-3), ("EEEE", -5.0, 1e-3),
                                     ("FFFF", math.inf, 1e-3), ("GGGG", math.nan, 1e-3), ("HHHH", 1e6, -1.0),
                                     ("IIII", 1e6, math.nan)]:
        request.links.add(peer_id=peer, bandwidth_bytes_per_second=bandwidth, latency_seconds=latency)
    assert heartbeat_from_request(request).links == LINKS


def test_the_view_carries_every_pairs_link() -> None:
    view = HouseholdView(self_id=DeviceId("AAAA"), term=Term(2), coordinator_id=None, roster_version=1, links=(
        PairLink(a="AAAA", b="BBBB", bandwidth_bytes_per_second=110e6, latency_seconds=0.4e-3,
                 measured_by=("AAAA", "BBBB")),
        PairLink(a="BBBB", b="CCCC", bandwidth_bytes_per_second=12e6, latency_seconds=3e-3)))
    assert view_from_wire(pb.ListPeersResponse.FromString(view_to_wire(view).SerializeToString())) == view
