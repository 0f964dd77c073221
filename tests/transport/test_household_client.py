"""A call whose channel is closed under it fails like an unreachable peer; the caller is not cancelled."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cetd.errors import UnavailableError
from cetd.transport.credentials import (
    channel_options,
    mutual_tls_channel_credentials,
    mutual_tls_server_credentials,
)
from cetd.transport.household_client import call_rpc

from .conftest import TestDevice


async def _serve(device: TestDevice) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("test.Slow", {"Echo": grpc.unary_unary_rpc_method_handler(_slow)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", mutual_tls_server_credentials(device.tls))
    await server.start()
    return server, port


def _channel(client: TestDevice, server: TestDevice, port: int) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", mutual_tls_channel_credentials(client.tls),
                                   options=channel_options(server.tls_name))


async def _slow(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    await asyncio.sleep(5)
    return request


@pytest.mark.timeout(30)
def test_channel_closed_under_a_call_is_unavailable_not_cancellation(household: list[TestDevice]) -> None:
    async def scenario() -> None:
        server, port = await _serve(household[0])
        try:
            channel = _channel(household[1], household[0], port)
            call = channel.unary_unary("/test.Slow/Echo")(b"x")
            closing = asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(channel.close()))
            with pytest.raises(UnavailableError, match="cancelled"):
                await call_rpc("peer", call)
            closing.cancel()
            # The calling task itself was not cancelled: it goes on.
            await asyncio.sleep(0)
        finally:
            await server.stop(None)

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_cancelling_the_caller_still_cancels(household: list[TestDevice]) -> None:
    async def scenario() -> None:
        server, port = await _serve(household[0])
        try:
            async with _channel(household[1], household[0], port) as channel:
                task = asyncio.ensure_future(call_rpc("peer", channel.unary_unary("/test.Slow/Echo")(b"x")))
                await asyncio.sleep(0.3)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        finally:
            await server.stop(None)

    asyncio.run(scenario())
