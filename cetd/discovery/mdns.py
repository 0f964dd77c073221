"""Announce this daemon and find the others with mDNS/DNS-SD, on zeroconf's asyncio API.

Three async context managers. `MdnsNode` owns one zeroconf instance (sockets on the chosen
interfaces) and is what the daemon uses: ``node.announcer(advert)`` and ``node.browser(callback)``
share its sockets. `MdnsAnnouncer` and `MdnsBrowser` also work alone, opening a private node.

mDNS only says where a peer might be: a `Sighting` is a hint to dial, never a proof of anything,
and its absence is no proof of death either (zeroconf sends no goodbye for a killed or cut-off
host; liveness comes from heartbeats). Malformed records are logged at debug level and dropped.

``interfaces=None`` lets zeroconf use every interface, which multicasts onto the real LAN: that is
for production only. Tests pass ``["127.0.0.1"]`` or the addresses of network namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType

import ifaddr
from zeroconf import IPVersion, NonUniqueNameException, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from cetd.discovery.advert import SERVICE_TYPE, Advert
from cetd.errors import IdentityError
from cetd.ids import DeviceId

__all__ = ["MdnsAnnouncer", "MdnsBrowser", "MdnsNode", "Sighting"]

logger = logging.getLogger(__name__)

_DNS_LABEL_MAX = 63


@dataclass(frozen=True, slots=True, kw_only=True)
class Sighting:
    """A peer seen on mDNS: what it announces and where to dial it."""

    advert: Advert
    host: str
    """IPv4 address from the record's A answers (the first one when there are several)."""
    port: int
    """Port from the SRV answer: the advert's mutual-TLS gRPC port."""


class MdnsNode:
    """One zeroconf instance shared by this daemon's announcer and browser.

    Args:
        interfaces: IPv4 addresses to bind to and multicast on, or None for every interface
            (production only: it reaches the real LAN).
    """

    def __init__(self, *, interfaces: Sequence[str] | None) -> None:
        self._interfaces = None if interfaces is None else list(interfaces)
        self._zeroconf: AsyncZeroconf | None = None

    @property
    def interfaces(self) -> list[str] | None:
        return self._interfaces

    @property
    def zeroconf(self) -> AsyncZeroconf:
        """The running zeroconf instance.

        Raises:
            RuntimeError: the node is not entered.
        """
        if self._zeroconf is None:
            raise RuntimeError("MdnsNode is not running: use it as 'async with'")
        return self._zeroconf

    def announcer(self, advert: Advert, *, address: str | None = None) -> MdnsAnnouncer:
        """An announcer registering ``advert`` through this node's sockets."""
        return MdnsAnnouncer(advert, address=address, node=self)

    def browser(
        self,
        on_sighting: Callable[[Sighting], None],
        *,
        ignore_device_id: DeviceId | None = None,
        resolve_timeout: timedelta = timedelta(seconds=1),
    ) -> MdnsBrowser:
        """A browser reporting peers seen through this node's sockets."""
        return MdnsBrowser(on_sighting, node=self, ignore_device_id=ignore_device_id, resolve_timeout=resolve_timeout)

    async def __aenter__(self) -> MdnsNode:
        if self._zeroconf is not None:
            raise RuntimeError("MdnsNode is already running")
        if self._interfaces is None:
            self._zeroconf = AsyncZeroconf()
        else:
            self._zeroconf = AsyncZeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is not None:
            await zeroconf.async_close()


class MdnsAnnouncer:
    """Registers this daemon's `Advert` for as long as the context is open.

    Args:
        advert: what to announce; its device ID names the service instance.
        address: the IPv4 address to publish; default: the node's interfaces when they were given,
            else every non-loopback IPv4 address of this host.
        interfaces: for a private node (see `MdnsNode`); leave None when ``node`` is given.
        node: a running shared node; None opens a private one on ``interfaces``.

    Raises (on entry):
        IdentityError: another host on the network already announces this device ID.
    """

    def __init__(
        self,
        advert: Advert,
        *,
        address: str | None = None,
        interfaces: Sequence[str] | None = None,
        node: MdnsNode | None = None,
    ) -> None:
        if node is not None and interfaces is not None:
            raise ValueError("give either a shared node or interfaces for a private one, not both")
        self._advert = advert
        self._address = address
        self._own_node = node is None
        self._node = node if node is not None else MdnsNode(interfaces=interfaces)
        self._info: AsyncServiceInfo | None = None

    @property
    def advert(self) -> Advert:
        """What is announced now."""
        return self._advert

    async def update(self, advert: Advert) -> None:
        """Announce a changed advert (e.g. pending to member, a new port) under the same name.

        Raises:
            ValueError: the device ID changed (a new identity needs a new announcer).
        """
        if advert.device_id != self._advert.device_id:
            raise ValueError(f"an announcer for {self._advert.device_id} cannot announce {advert.device_id}")
        if advert == self._advert and self._info is not None:
            return
        self._advert = advert
        if self._info is None:
            return  # not entered yet: __aenter__ registers the new advert
        info = self._service_info(advert)
        await (await self._node.zeroconf.async_update_service(info))
        self._info = info
        logger.debug("%s: mDNS advert updated: %s", advert.device_id, advert.to_txt())

    async def __aenter__(self) -> MdnsAnnouncer:
        if self._own_node:
            await self._node.__aenter__()
        try:
            info = self._service_info(self._advert)
            try:
                await (await self._node.zeroconf.async_register_service(info))
            except NonUniqueNameException:
                raise IdentityError(
                    f"another host already announces device {self._advert.device_id} on mDNS; "
                    "was this device's state directory copied from it?"
                ) from None
            self._info = info
        except BaseException:
            if self._own_node:
                await self._node.__aexit__(None, None, None)
            raise
        logger.info(
            "%s: announcing %s on %s port %d",
            self._advert.device_id,
            SERVICE_TYPE,
            ",".join(self._addresses()),
            self._advert.port,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        info, self._info = self._info, None
        try:
            if info is not None:
                # A goodbye helps browsers that are listening; losing it is harmless (see module doc).
                with contextlib.suppress(Exception):
                    await (await self._node.zeroconf.async_unregister_service(info))
        finally:
            if self._own_node:
                await self._node.__aexit__(exc_type, exc, tb)

    def _service_info(self, advert: Advert) -> AsyncServiceInfo:
        label = advert.device_id[:_DNS_LABEL_MAX]
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=advert.port,
            properties=advert.to_txt(),
            server=f"{label.lower()}.local.",
            parsed_addresses=self._addresses(),
        )

    def _addresses(self) -> list[str]:
        if self._address is not None:
            return [self._address]
        interfaces = self._node.interfaces
        if interfaces is not None:
            return list(interfaces)
        return _host_ipv4_addresses()


class MdnsBrowser:
    """Reports every `Sighting` of a cetd service, new or changed, to ``on_sighting``.

    Resolution runs in tasks this browser owns and cancels on exit; ``on_sighting`` is called on
    the event loop and must not block. An exception it raises is logged, never propagated.

    Args:
        on_sighting: called for each added or updated service that parses; repeated identical
            sightings of one service are reported once.
        interfaces: for a private node (see `MdnsNode`); leave None when ``node`` is given.
        node: a running shared node; None opens a private one on ``interfaces``.
        ignore_device_id: this daemon's own device ID, whose records are not reported.
        resolve_timeout: how long to wait for a service's SRV/TXT/A answers.
    """

    def __init__(
        self,
        on_sighting: Callable[[Sighting], None],
        *,
        interfaces: Sequence[str] | None = None,
        node: MdnsNode | None = None,
        ignore_device_id: DeviceId | None = None,
        resolve_timeout: timedelta = timedelta(seconds=1),
    ) -> None:
        if node is not None and interfaces is not None:
            raise ValueError("give either a shared node or interfaces for a private one, not both")
        self._on_sighting = on_sighting
        self._own_node = node is None
        self._node = node if node is not None else MdnsNode(interfaces=interfaces)
        self._ignore_device_id = ignore_device_id
        self._resolve_timeout_ms = resolve_timeout.total_seconds() * 1000
        self._browser: AsyncServiceBrowser | None = None
        self._running = False
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._reported: dict[str, Sighting] = {}

    async def __aenter__(self) -> MdnsBrowser:
        if self._own_node:
            await self._node.__aenter__()
        # Set before the browser exists: it reports cached services from inside its constructor.
        self._running = True
        self._browser = AsyncServiceBrowser(
            self._node.zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._on_service_state_change]
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        browser, self._browser = self._browser, None
        self._running = False
        try:
            if browser is not None:
                await browser.async_cancel()
            tasks = list(self._resolving.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._resolving.clear()
        finally:
            if self._own_node:
                await self._node.__aexit__(exc_type, exc, tb)

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # zeroconf calls handlers by keyword: the parameter names above are part of its API.
        if state_change is ServiceStateChange.Removed:
            self._reported.pop(name, None)
            return
        if not self._running:
            return
        previous = self._resolving.pop(name, None)
        if previous is not None:
            previous.cancel()  # the newer change supersedes it
        task = asyncio.get_running_loop().create_task(self._resolve(name), name=f"mdns-resolve {name}")
        self._resolving[name] = task
        task.add_done_callback(lambda done: self._forget_task(name, done))

    def _forget_task(self, name: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(name) is task:
            del self._resolving[name]

    async def _resolve(self, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._node.zeroconf.zeroconf, self._resolve_timeout_ms):
            logger.debug("mDNS service %s did not resolve in time", name)
            return
        sighting = _sighting_from(name, info)
        if sighting is None:
            return
        if sighting.advert.device_id == self._ignore_device_id or self._reported.get(name) == sighting:
            return
        self._reported[name] = sighting
        try:
            self._on_sighting(sighting)
        except Exception:
            logger.exception("mDNS sighting handler failed for %s", name)


def _sighting_from(name: str, info: AsyncServiceInfo) -> Sighting | None:
    try:
        advert = Advert.from_txt(info.properties)
    except ValueError as error:
        logger.debug("ignoring mDNS service %s with a malformed TXT record: %s", name, error)
        return None
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses or info.port is None:
        logger.debug("ignoring mDNS service %s without an IPv4 address or port", name)
        return None
    return Sighting(advert=advert, host=addresses[0], port=info.port)


def _host_ipv4_addresses() -> list[str]:
    """Every non-loopback IPv4 address of this host, for announcing on all interfaces."""
    addresses = {
        ip.ip
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if isinstance(ip.ip, str) and not ipaddress.IPv4Address(ip.ip).is_loopback
    }
    return sorted(addresses) or ["127.0.0.1"]
