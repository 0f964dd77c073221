"""The composition root: wires identity, discovery, transport and the household node into one daemon.

Lifecycle: load the identity (or join first: a token from the config, else owner approval), bind the
mutual-TLS endpoint (and the enrollment endpoint on the CA holder), announce over mDNS, heartbeat
until SIGTERM/SIGINT, then unregister and close every stream. Everything long-lived is owned here and
awaited on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import timedelta

import ifaddr

from cetd.cluster.membership import FailureDetectorConfig
from cetd.cluster.power import hardware_hints, profile_for
from cetd.discovery import Advert, CapabilitySummary, MdnsNode, Sighting
from cetd.errors import CetdError, IdentityError, TokenError
from cetd.identity import (
    Identity,
    JoinToken,
    StateDir,
    device_id_from_public_key,
    load_identity,
    load_or_create_device_key,
    short_id,
)
from cetd.ids import PROTOCOL_VERSION, DeviceId, HouseholdId
from cetd.transport.household_server import EnrollmentEndpoint, MemberEndpoint
from cetd.transport.jobs_service import SERVICE_NAME as JOBS_SERVICE_NAME
from cetd.transport.jobs_service import add_jobs_service
from cetd.transport.peer_info import Capabilities, PeerInfo

from .capabilities import detect_capabilities, keep_free_memory
from .config import Config
from .household import HouseholdNode
from .jobs import JobManager
from .joining import join_household
from .logs import set_log_device
from .notify import sd_notify
from .profiler import keep_profiled, load_profile
from .runtime_file import DaemonRuntime

logger = logging.getLogger(__name__)


def advertise_host(config: Config) -> str:
    """The address peers should dial: configured, else the first mDNS interface, else a LAN address."""
    if config.daemon.advertise_host:
        return config.daemon.advertise_host
    if config.daemon.listen_host not in ("0.0.0.0", "::", ""):
        return config.daemon.listen_host
    if config.discovery.interfaces:
        return config.discovery.interfaces[0]
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                return ip.ip
    return "127.0.0.1"


def _interfaces(config: Config) -> list[str] | None:
    return list(config.discovery.interfaces) or None


def _advert(device_id: DeviceId, household: HouseholdId | None, port: int, enroll_port: int,
            caps: Capabilities) -> Advert:
    return Advert(
        device_id=device_id, household_id=household or HouseholdId(""), port=port, enroll_port=enroll_port,
        state="member" if household else "pending",
        capabilities=CapabilitySummary(cores=caps.cores, memory_bytes=caps.memory_bytes,
                                       accelerator=caps.accelerator, rank=caps.rank),
        protocol_version=PROTOCOL_VERSION,
    )


@contextlib.asynccontextmanager
async def enrollment_candidates(
    config: Config, pending_advert: Advert | None = None
) -> AsyncIterator[Callable[[], list[tuple[str, int]]]]:
    """Browse mDNS for enrollment endpoints while joining; announce ``pending_advert`` meanwhile."""
    found: dict[str, tuple[str, int]] = {}

    def on_sighting(sighting: Sighting) -> None:
        if sighting.advert.state == "member" and sighting.advert.enroll_port:
            found[sighting.advert.device_id] = (sighting.host, sighting.advert.enroll_port)

    def candidates() -> list[tuple[str, int]]:
        return list(found.values())

    if not config.discovery.mdns:
        yield candidates
        return
    async with MdnsNode(interfaces=_interfaces(config)) as node, contextlib.AsyncExitStack() as stack:
        if pending_advert is not None:
            await stack.enter_async_context(node.announcer(pending_advert, address=advertise_host(config)))
        await stack.enter_async_context(node.browser(on_sighting))
        yield candidates


async def obtain_identity(config: Config, state: StateDir, caps: Capabilities) -> Identity:
    """Load this device's identity, joining the household first when it has none."""
    try:
        return load_identity(state)
    except IdentityError:
        if state.device_cert.exists():
            raise  # an identity that is there but broken (or copied) is not silently replaced
    token = JoinToken.decode(config.join.token) if config.join.token else None
    if token is None and not config.join.owner_approval:
        raise IdentityError(
            f"{state.path} holds no identity: run `cetd init` (first device) or `cetd join TOKEN`, or put "
            "a token in [join] token"
        )
    key = load_or_create_device_key(state)
    device_id = device_id_from_public_key(key.public_key())
    set_log_device(short_id(device_id))
    logger.info("no identity yet: joining %s", "with the configured token" if token else "by owner approval")
    # Without a token, advertise as pending so that members show this device in `cetctl peers`.
    pending = _advert(device_id, None, 0, 0, caps) if token is None else None
    async with enrollment_candidates(config, pending) as candidates:
        static = [(h, p) for h, p in config.discovery.static_peer_addresses]

        async def all_candidates() -> list[tuple[str, int]]:
            return candidates() + static

        outcome = await join_household(
            state, name=config.daemon.device_name, capabilities=caps, candidates=all_candidates,
            token=token, wait=timedelta(days=365) if token is None else timedelta(minutes=10),
        )
    return outcome.identity


class Daemon:
    """One running cetd: owns the endpoints, mDNS and the household node."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = StateDir(config.daemon.state_dir)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        config = self.config
        self.state.ensure()
        threads = config.training.worker_threads or (os.cpu_count() or 1)
        caps = replace(
            detect_capabilities(rank_override=float(config.device.rank),
                                memory_limit_bytes=config.device.memory_limit_bytes),
            power_profile=profile_for(config.device.power_profile, hints=hardware_hints()).name,
            block_seconds=load_profile(self.state.path, threads),
        )
        identity = await obtain_identity(config, self.state, caps)
        set_log_device(short_id(identity.device_id))
        membership = config.membership
        node = HouseholdNode(
            identity=identity, state=self.state, capabilities=caps,
            detector=FailureDetectorConfig(
                heartbeat_interval=membership.heartbeat_interval,
                suspect_after=membership.suspect_after,
                dead_after=membership.dead_after,
            ),
            startup_grace=membership.startup_grace,
        )
        host = advertise_host(config)
        async with contextlib.AsyncExitStack() as stack:
            jobs = JobManager(node, self.state, host=host, worker_threads=config.training.worker_threads,
                              checkpoint_dir=config.checkpoint_path, profile=config.device.profile)
            stack.push_async_callback(jobs.close)
            member = await stack.enter_async_context(MemberEndpoint(
                node, node.material, host=config.daemon.listen_host, port=config.daemon.port,
                extra_services=[add_jobs_service(jobs)], extra_service_names=[JOBS_SERVICE_NAME]))
            enroll_port = 0
            if node.enroller is not None:
                enrollment = await stack.enter_async_context(EnrollmentEndpoint(
                    node.enroller, node.material, host=config.daemon.listen_host, port=config.daemon.enroll_port))
                enroll_port = enrollment.port
            node.set_endpoints(f"{host}:{member.port}", f"{host}:{enroll_port}" if enroll_port else "")
            for address in config.discovery.static_peers:
                node.add_static_peer(address)
            if config.discovery.mdns:
                mdns = await stack.enter_async_context(MdnsNode(interfaces=_interfaces(config)))
                await stack.enter_async_context(mdns.announcer(
                    _advert(identity.device_id, identity.household_id, member.port, enroll_port, caps),
                    address=host,
                ))
                await stack.enter_async_context(mdns.browser(
                    lambda s: self._on_sighting(node, identity, s), ignore_device_id=identity.device_id,
                ))
            local = "127.0.0.1" if config.daemon.listen_host in ("0.0.0.0", "") else config.daemon.listen_host
            DaemonRuntime(device_id=identity.device_id, address=f"{local}:{member.port}", port=member.port,
                          enroll_port=enroll_port, pid=os.getpid()).write(self.state.path)
            heartbeats = asyncio.get_running_loop().create_task(node.run(), name="heartbeats")
            memory = asyncio.get_running_loop().create_task(
                keep_free_memory(lambda: node.capabilities, node.update_capabilities), name="free memory")
            stack.push_async_callback(_cancel, memory)
            if config.device.profile:
                profiling = asyncio.get_running_loop().create_task(keep_profiled(
                    self.state.path, threads, lambda: node.capabilities, node.update_capabilities, node.busy,
                    lock=jobs.shapes.lock),
                    name="profiler")
                stack.push_async_callback(_cancel, profiling)
            await jobs.resume_unfinished()
            logger.info("device %s (%s) serving on %s:%d%s", identity.device_id, identity.name, host, member.port,
                        f", enrollment on port {enroll_port}" if enroll_port else "")
            sd_notify("READY=1\nSTATUS=serving")
            try:
                stop_wait = asyncio.get_running_loop().create_task(self._stop.wait())
                done, _ = await asyncio.wait({heartbeats, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                if heartbeats in done:
                    heartbeats.result()  # surfaces a crash of the heartbeat loop
            finally:
                sd_notify("STOPPING=1")
                if self._stop.is_set():
                    # A planned stop (SIGTERM): move our share of running jobs to other devices first.
                    await jobs.leave_before_shutdown()
                heartbeats.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeats
                await node.close()
                with contextlib.suppress(FileNotFoundError):
                    (self.state.path / "runtime.json").unlink()
        logger.info("stopped")
        return 0

    @staticmethod
    def _on_sighting(node: HouseholdNode, identity: Identity, sighting: Sighting) -> None:
        advert = sighting.advert
        summary = advert.capabilities
        caps = Capabilities(cores=summary.cores, memory_bytes=summary.memory_bytes,
                            accelerator=summary.accelerator, rank=summary.rank)
        if advert.state == "pending":
            node.note_pending(PeerInfo(device_id=advert.device_id, name="", address=sighting.host,
                                       capabilities=caps))
        elif advert.household_id == identity.household_id:
            node.note_peer(PeerInfo(
                device_id=advert.device_id, name="", address=f"{sighting.host}:{advert.port}",
                capabilities=caps,
                enroll_address=f"{sighting.host}:{advert.enroll_port}" if advert.enroll_port else "",
            ))


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_daemon(config: Config) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    try:
        return await daemon.run()
    except TokenError as error:
        logger.error("cannot join: %s", error)
        return error.exit_code
    except CetdError as error:
        logger.error("%s", error)
        return error.exit_code
