"""Per-call authentication of members: the mutual-TLS peer certificate → device ID → roster check.

TLS already proved the peer holds a key certified by the household CA (and that the certificate has
not expired). This interceptor adds what TLS cannot know: whether that device is still a member, i.e.
listed in the signed roster and not revoked. It runs on every call, so a revocation takes effect on the
very next call, including calls on connections opened before it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Protocol

import grpc

from cetd.errors import (
    CetdError,
    ConfigError,
    JobError,
    NotAuthorizedError,
    StaleTermError,
    TokenError,
    UnavailableError,
)
from cetd.identity import peer_device_id_from_pem
from cetd.ids import DeviceId

logger = logging.getLogger(__name__)

CALLER: ContextVar[DeviceId] = ContextVar("cetd_caller")
"""The authenticated device ID of the peer whose call is being served."""


class MemberAuthorizer(Protocol):
    """Decides whether an authenticated device may call us now."""

    def authorize(self, device_id: DeviceId) -> None:
        """Return if ``device_id`` is a current member; raise `NotAuthorizedError` with the reason if not."""


def status_for(error: CetdError) -> grpc.StatusCode:
    """The gRPC status code that carries an expected failure to the caller."""
    if isinstance(error, TokenError | NotAuthorizedError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(error, StaleTermError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, ConfigError | JobError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.FAILED_PRECONDITION


def caller_device_id(context: grpc.aio.ServicerContext[Any, Any]) -> DeviceId:
    """The device ID in the client's verified certificate; `NotAuthorizedError` when there is none."""
    auth = context.auth_context()
    pems = list(auth.get("x509_pem_cert") or [])
    if not pems:
        raise NotAuthorizedError("the caller presented no client certificate")
    return peer_device_id_from_pem(pems[0])


class MemberAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # stubs lack generics
    """Wraps every handler so that it first checks the caller against the authorizer."""

    def __init__(self, authorizer: MemberAuthorizer) -> None:
        self._authorizer = authorizer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        # grpc-stubs types handlers for the sync API only; the aio handlers are coroutines and
        # async generators, so they are handled as Any here.
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        authorizer = self._authorizer

        def refusal(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
            """The reason to refuse this call, or None after recording the caller in `CALLER`."""
            try:
                device_id = caller_device_id(context)
                authorizer.authorize(device_id)
            except CetdError as error:
                logger.warning("refused %s: %s", method, error)
                return str(error)
            CALLER.set(device_id)
            return None

        async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            reason = refusal(context)
            if reason is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)

        def refuse_stream(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
            # Inside an async generator, abort() surfaces as INTERNAL; set the status and end instead.
            reason = refusal(context)
            if reason is None:
                return False
            context.set_code(grpc.StatusCode.PERMISSION_DENIED)
            context.set_details(reason)
            return True

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await check(context)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if refuse_stream(context):
                    return
                async for item in inner_us(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await check(context)
                return await inner_su(requests, context)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer
            )
        inner_ss = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if refuse_stream(context):
                return
            async for item in inner_ss(requests, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )
