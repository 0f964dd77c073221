"""mDNS announce/browse with real zeroconf sockets, bound to 127.0.0.1 only.

Other processes on this machine may announce cetd services on loopback too, so every test uses a
fresh random household ID and device IDs and looks only at its own sightings.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from cetd.discovery.advert import SERVICE_TYPE, Advert, AdvertState, CapabilitySummary
from cetd.discovery.mdns import MdnsAnnouncer, MdnsBrowser, MdnsNode, Sighting, _host_ipv4_addresses
from cetd.errors import IdentityError
from cetd.ids import DeviceId, HouseholdId

LOOPBACK = ["127.0.0.1"]
FIND_WITHIN_S = 8.0
T = TypeVar("T")


def run(coroutine_factory: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coroutine_factory()

    return asyncio.run(main())


class Recorder:
    """Collects the sightings of one household, by device ID."""

    def __init__(self, household: HouseholdId) -> None:
        self.household = household
        self.sightings: list[Sighting] = []

    def __call__(self, sighting: Sighting) -> None:
        if sighting.advert.household_id == self.household or sighting.advert.device_id.startswith(
            self.household[:8].upper()
        ):
            self.sightings.append(sighting)

    def latest(self) -> dict[DeviceId, Sighting]:
        return {sighting.advert.device_id: sighting for sighting in self.sightings}

    async def wait_for(self, predicate: Callable[[dict[DeviceId, Sighting]], bool]) -> float:
        started = time.monotonic()
        while not predicate(self.latest()):
            if time.monotonic() - started > FIND_WITHIN_S:
                raise AssertionError(f"not seen within {FIND_WITHIN_S} s: {self.latest()}")
            await asyncio.sleep(0.05)
        return time.monotonic() - started


class Household:
    """Random IDs for one test's devices."""

    def __init__(self) -> None:
        self.id = HouseholdId(secrets.token_hex(16))

    def device(self, index: int) -> DeviceId:
        return DeviceId(f"{self.id[:8].upper()}-{index}")

    def advert(self, index: int, *, state: AdvertState = "member", port: int = 7000) -> Advert:
        return Advert(
            device_id=self.device(index),
            household_id=self.id if state == "member" else HouseholdId(""),
            port=port + index,
            enroll_port=9000 if index == 0 else 0,
            state=state,
            capabilities=CapabilitySummary(
                cores=index + 1, memory_bytes=(index + 2) * 2**30, accelerator="", rank=float(index) + 0.5
            ),
        )


@pytest.mark.timeout(60)
def test_three_nodes_find_each_other_with_their_adverts() -> None:
    household = Household()
    recorders = [Recorder(household.id) for _ in range(3)]

    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            nodes = [await stack.enter_async_context(MdnsNode(interfaces=LOOPBACK)) for _ in range(3)]
            for index, node in enumerate(nodes):
                await stack.enter_async_context(
                    node.browser(recorders[index], ignore_device_id=household.device(index))
                )
            await asyncio.gather(
                *(
                    stack.enter_async_context(node.announcer(household.advert(index)))
                    for index, node in enumerate(nodes)
                )
            )
            for index, recorder in enumerate(recorders):
                others = {household.device(other) for other in range(3) if other != index}
                await recorder.wait_for(lambda seen, others=others: set(seen) == others)  # type: ignore[misc]
                # Our own advert is never reported, only the two others.
                for device_id, sighting in recorder.latest().items():
                    other = int(device_id.rsplit("-", 1)[1])
                    assert sighting.advert == household.advert(other)
                    assert sighting.host == "127.0.0.1"
                    assert sighting.port == 7000 + other

    run(scenario)
    for recorder in recorders:
        assert len(recorder.sightings) == 2  # identical repeats are reported once


@pytest.mark.timeout(60)
def test_update_propagates_pending_to_member_with_new_port() -> None:
    household = Household()
    recorder = Recorder(household.id)
    pending = household.advert(1, state="pending", port=0)
    member = household.advert(1, port=7443)

    async def scenario() -> None:
        async with (
            MdnsBrowser(recorder, interfaces=LOOPBACK),
            MdnsAnnouncer(pending, interfaces=LOOPBACK, address="127.0.0.1") as announcer,
        ):
            await recorder.wait_for(lambda seen: household.device(1) in seen)
            assert recorder.latest()[household.device(1)].advert.state == "pending"
            assert recorder.latest()[household.device(1)].port == 1
            await announcer.update(member)
            assert announcer.advert == member
            elapsed = await recorder.wait_for(lambda seen: seen[household.device(1)].advert.state == "member")
            assert elapsed < 5.0
            sighting = recorder.latest()[household.device(1)]
            assert sighting.advert == member
            assert sighting.port == 7444
            with pytest.raises(ValueError, match="cannot announce"):
                await announcer.update(household.advert(2))

    run(scenario)
    assert [s.advert.state for s in recorder.sightings] == ["pending", "member"]


@pytest.mark.timeout(60)
def test_txt_record_on_the_wire_holds_only_the_short_keys_and_no_household_name() -> None:
    household = Household()
    household_name = "The Smith Family Home"
    advert = household.advert(0)

    async def scenario() -> dict[bytes, bytes | None]:
        async with (
            MdnsAnnouncer(advert, interfaces=LOOPBACK),
            MdnsNode(interfaces=LOOPBACK) as observer,
        ):
            info = AsyncServiceInfo(SERVICE_TYPE, f"{advert.device_id}.{SERVICE_TYPE}")
            assert await info.async_request(observer.zeroconf.zeroconf, 3000)
            return dict(info.properties)

    properties = run(scenario)
    assert set(properties) == {b"v", b"hh", b"id", b"p", b"ep", b"st", b"c", b"m", b"a", b"r"}
    assert properties[b"hh"] == household.id.encode()
    wire = b"".join(key + (value or b"") for key, value in properties.items())
    assert household_name.encode() not in wire
    assert b"Smith" not in wire


@pytest.mark.timeout(60)
def test_malformed_records_are_ignored_and_browsing_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    household = Household()
    recorder = Recorder(household.id)
    good = household.advert(0)
    garbage: list[dict[str, str] | dict[bytes, bytes]] = [
        {"v": "1", "id": str(household.device(5)), "p": "x"},
        {"id": str(household.device(6))},
        {b"id": household.device(7).encode(), b"st": b"\xff\xfe"},
    ]

    async def scenario() -> None:
        async with (
            MdnsBrowser(recorder, interfaces=LOOPBACK),
            AsyncZeroconf(interfaces=LOOPBACK) as rogue,
        ):
            registrations = [
                await rogue.async_register_service(
                    AsyncServiceInfo(
                        SERVICE_TYPE,
                        f"{household.device(index)}.{SERVICE_TYPE}",
                        port=1234,
                        properties=properties,
                        server=f"rogue-{household.id[:8]}-{index}.local.",
                        parsed_addresses=["127.0.0.1"],
                    )
                )
                for index, properties in enumerate(garbage, start=5)
            ]
            await asyncio.gather(*registrations)
            async with MdnsAnnouncer(good, interfaces=LOOPBACK):
                await recorder.wait_for(lambda seen: household.device(0) in seen)
                await asyncio.sleep(0.5)

    with caplog.at_level(logging.DEBUG, logger="cetd.discovery.mdns"):
        run(scenario)
    assert [s.advert.device_id for s in recorder.sightings] == [household.device(0)]
    malformed = [r.getMessage() for r in caplog.records if "malformed TXT" in r.getMessage()]
    for index in (5, 6, 7):
        assert any(household.device(index) in message for message in malformed), malformed


@pytest.mark.timeout(60)
def test_failing_handler_does_not_stop_the_browser(caplog: pytest.LogCaptureFixture) -> None:
    household = Household()
    recorder = Recorder(household.id)

    def flaky(sighting: Sighting) -> None:
        recorder(sighting)
        if sighting.advert.device_id == household.device(0):
            raise RuntimeError("handler bug")

    async def scenario() -> None:
        async with MdnsNode(interfaces=LOOPBACK) as node, node.browser(flaky):
            async with MdnsAnnouncer(household.advert(0), interfaces=LOOPBACK):
                await recorder.wait_for(lambda seen: household.device(0) in seen)
            async with MdnsAnnouncer(household.advert(1), interfaces=LOOPBACK):
                await recorder.wait_for(lambda seen: household.device(1) in seen)

    with caplog.at_level(logging.ERROR, logger="cetd.discovery.mdns"):
        run(scenario)
    assert any("handler failed" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
def test_clean_shutdown_leaves_no_tasks_and_closes_the_node() -> None:
    household = Household()
    recorder = Recorder(household.id)

    async def scenario() -> None:
        node = MdnsNode(interfaces=LOOPBACK)
        async with node:
            browser = node.browser(recorder)
            async with (
                node.announcer(household.advert(0)),
                browser,
                MdnsAnnouncer(household.advert(1), interfaces=LOOPBACK),
            ):
                await recorder.wait_for(lambda seen: household.device(1) in seen)
            assert browser._resolving == {}
        with pytest.raises(RuntimeError, match="not running"):
            _ = node.zeroconf
        await asyncio.sleep(0)
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert leftover == []

    run(scenario)


@pytest.mark.timeout(60)
def test_a_second_host_with_the_same_device_id_is_refused() -> None:
    household = Household()
    recorder = Recorder(household.id)

    async def scenario() -> None:
        async with (
            MdnsNode(interfaces=LOOPBACK) as second_host,
            MdnsAnnouncer(household.advert(0), interfaces=LOOPBACK),
        ):
            # Detection is best effort: it works once the second host has heard the first one
            # (always, on a LAN, after the first announcement), which the browser makes sure of here.
            async with second_host.browser(recorder):
                await recorder.wait_for(lambda seen: household.device(0) in seen)
            with pytest.raises(IdentityError, match="state directory copied"):
                async with second_host.announcer(household.advert(0, port=8000)):
                    pass

    run(scenario)


@pytest.mark.timeout(10)
def test_node_and_interfaces_are_exclusive() -> None:
    household = Household()
    node = MdnsNode(interfaces=LOOPBACK)
    with pytest.raises(ValueError, match="not both"):
        MdnsAnnouncer(household.advert(0), node=node, interfaces=LOOPBACK)
    with pytest.raises(ValueError, match="not both"):
        MdnsBrowser(lambda sighting: None, node=node, interfaces=LOOPBACK)


@pytest.mark.timeout(10)
def test_default_published_addresses_are_the_hosts_non_loopback_ipv4() -> None:
    addresses = _host_ipv4_addresses()
    assert addresses, "at least one address is always published"
    parsed = [ipaddress.IPv4Address(address) for address in addresses]
    assert addresses == sorted(set(addresses))
    assert not any(ip.is_loopback for ip in parsed) or addresses == ["127.0.0.1"]
