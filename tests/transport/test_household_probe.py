"""A link probe over the real member endpoint: answered when the device is idle, refused with its reason when
it trains or times itself (a late answer would be taken for a slow link)."""

from __future__ import annotations

import asyncio

import pytest

from cetd.errors import UnavailableError
from cetd.ids import DeviceId
from cetd.transport.household_client import PeerClient
from cetd.transport.household_server import MemberEndpoint

from .conftest import TestDevice


class _Device:
    """The handler's two calls a probe makes: who may call, and whether to answer now."""

    def __init__(self) -> None:
        self.refusal = ""

    def authorize(self, device_id: DeviceId) -> None:
        return None

    def probe_refusal(self) -> str:
        return self.refusal


@pytest.mark.timeout(30)
def test_a_busy_device_refuses_probes_with_its_reason(household: list[TestDevice]) -> None:
    async def scenario() -> None:
        device = _Device()
        async with MemberEndpoint(device, household[0].tls, host="127.0.0.1", port=0) as endpoint:
            client = PeerClient(f"127.0.0.1:{endpoint.port}", household[0].tls_name, household[1].tls)
            try:
                assert await client.probe(64 * 1024, 1) > 0
                device.refusal = "this device is timing its own speed"
                with pytest.raises(UnavailableError, match="not probed now: this device is timing its own speed"):
                    await client.probe(64 * 1024, 1)
                device.refusal = ""
                assert await client.probe(1, 1) > 0
            finally:
                await client.close()

    asyncio.run(scenario())
