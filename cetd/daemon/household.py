"""One daemon's view of its household: address book, heartbeats, failure detection, election, roster.

`HouseholdNode` is the shell around the pure cores in `cetd.cluster`: it feeds them heartbeats and the
clock, answers the household RPCs, and pushes or pulls the signed roster. Admin mutations (invite,
approve, revoke) are done by the CA holder; any other member forwards them there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from datetime import timedelta

from cetd.cluster.election import Claim, Election, ElectionConfig, Role
from cetd.cluster.link_probes import LinkProbes, LinkReading, pair_links
from cetd.cluster.membership import FailureDetectorConfig, MembershipTable, PeerState
from cetd.errors import CetdError, IdentityError, NotAuthorizedError, UnavailableError
from cetd.identity import (
    Identity,
    SignedRoster,
    StateDir,
    device_id_from_certificate,
    fetch_peer_chain,
    tls_server_name,
)
from cetd.ids import DeviceId, Term
from cetd.transport.credentials import TlsMaterial
from cetd.transport.household_client import PeerClient
from cetd.transport.peer_info import (
    Capabilities,
    CommandEnvelope,
    Heartbeat,
    HouseholdView,
    MeasuredLink,
    PairLink,
    PeerInfo,
    PeerStatus,
)

from .enrollment import Enroller
from .roster_keeper import RosterKeeper

logger = logging.getLogger(__name__)


class HouseholdNode:
    """Membership, election and roster for one daemon; implements `HouseholdHandler`."""

    def __init__(
        self,
        *,
        identity: Identity,
        state: StateDir,
        capabilities: Capabilities,
        detector: FailureDetectorConfig,
        startup_grace: timedelta,
    ) -> None:
        self.identity = identity
        self.capabilities = capabilities
        self.material = TlsMaterial(
            key_pem=identity.key_pem, cert_chain_pem=identity.cert_chain_pem, ca_pem=identity.ca_pem
        )
        self.roster = RosterKeeper(state, identity)
        self.table: MembershipTable[PeerInfo] = MembershipTable(detector)
        self.election = Election(
            self_id=identity.device_id,
            self_rank=capabilities.rank,
            config=ElectionConfig(startup_grace=startup_grace),
        )
        self.enroller = (
            Enroller(identity, state, self.roster, self.publish_roster) if identity.is_ca_holder else None
        )
        self.self_info = PeerInfo(
            device_id=identity.device_id, name=identity.name, address="", capabilities=capabilities
        )
        self._detector = detector
        self._started = time.monotonic()
        self._addresses: dict[DeviceId, PeerInfo] = {}
        self._clients: dict[DeviceId, PeerClient] = {}
        self._static: dict[str, float] = {}  # host:port → next resolution attempt (monotonic)
        self._pending_seen: dict[DeviceId, PeerInfo] = {}
        self._last_role: tuple[Role, Term, DeviceId | None] | None = None
        self._pulls: set[asyncio.Task[None]] = set()
        self.links = LinkProbes()
        """Peer → (bandwidth bytes/s, latency s) measured from this daemon: the best of its recent probes."""
        self.reported_links: dict[DeviceId, dict[str, tuple[float, float]]] = {}
        """Member → its peer → (bandwidth bytes/s, latency s), as that member's latest heartbeat reported its
        own probes: with `links`, every pair that either end measured."""
        self.busy: Callable[[], bool] = lambda: False
        """Whether a job process runs here: link probes then wait, so as not to disturb training."""
        self.measuring: Callable[[], bool] = lambda: False
        """Whether this device times itself now (a shape or the reference block): probes wait too."""
        self._probe_turn = 0

    # -- set-up --------------------------------------------------------------------------------------

    def update_capabilities(self, capabilities: Capabilities) -> None:
        """New measurements (e.g. the profiler's block time): advertised from the next heartbeat on."""
        self.capabilities = capabilities
        self.self_info = PeerInfo(
            device_id=self.identity.device_id, name=self.identity.name, address=self.self_info.address,
            capabilities=capabilities, enroll_address=self.self_info.enroll_address,
        )

    def set_endpoints(self, address: str, enroll_address: str = "") -> None:
        """Record where this daemon listens, once its servers are bound."""
        self.self_info = PeerInfo(
            device_id=self.identity.device_id, name=self.identity.name, address=address,
            capabilities=self.capabilities, enroll_address=enroll_address,
        )

    def add_static_peer(self, address: str) -> None:
        """A peer to dial directly (networks without multicast); its device ID is learned over TLS."""
        self._static[address] = 0.0

    def note_peer(self, info: PeerInfo) -> None:
        """A peer of this household was seen (mDNS, gossip, static resolution): remember its address."""
        if info.device_id == self.identity.device_id or not info.address:
            return
        known = self._addresses.get(info.device_id)
        if known is not None and known.address != info.address:
            self._drop_client(info.device_id)
        self._addresses[info.device_id] = info

    def note_pending(self, info: PeerInfo) -> None:
        """A daemon without identity advertises itself; shown as pending by `cetctl peers`."""
        if not self.roster.roster.is_member(info.device_id):
            self._pending_seen[info.device_id] = info

    # -- HouseholdHandler ----------------------------------------------------------------------------

    def probe_refusal(self) -> str:
        if self.busy():
            return "a job runs on this device"
        if self.measuring():
            return "this device is timing its own speed"
        return ""

    def authorize(self, device_id: DeviceId) -> None:
        self.roster.authorize(device_id)

    async def on_heartbeat(self, heartbeat: Heartbeat) -> Heartbeat:
        if heartbeat.sender.device_id == self.identity.device_id:
            message = (
                "another daemon presents this device's own certificate: its state directory was copied; "
                "refusing it (run `cetd join` on the copy to make it a device of its own)"
            )
            logger.error("%s (from %s)", message, heartbeat.sender.address)
            raise NotAuthorizedError(message)
        self._observe(heartbeat)
        return self.heartbeat()

    def signed_roster(self) -> SignedRoster:
        return self.roster.signed

    async def on_roster(self, roster: SignedRoster) -> int:
        self._adopt_roster(roster)
        return self.roster.version

    async def on_command(self, command: CommandEnvelope) -> Term:
        self.election.validate_command(command.term, command.coordinator_id)
        logger.info("command %s accepted from coordinator %s (term %d)",
                    command.kind, command.coordinator_id, command.term)
        return self.election.term

    async def list_peers(self) -> HouseholdView:
        now = time.monotonic()
        coordinator = self.election.coordinator_id
        term = self.election.term
        roster = self.roster.roster
        rows: list[PeerStatus] = [
            PeerStatus(info=self.self_info, state="alive", role=self._role_of(self.identity.device_id),
                       term=term, last_seen_s=0.0)
        ]
        seen = {self.identity.device_id}
        for record in self.table.snapshot(now):
            seen.add(record.device_id)
            state = "revoked" if record.device_id in roster.revoked else record.state.value
            bandwidth, latency = self.links.get(record.device_id, (0.0, 0.0))
            rows.append(PeerStatus(
                info=record.info, state=state,
                role=self._role_of(record.device_id) if record.state is not PeerState.DEAD else "", term=term,
                last_seen_s=record.last_seen_age.total_seconds(), bandwidth_bytes_per_second=bandwidth,
                latency_seconds=latency,
            ))
        for member in roster.active_members():
            if member.device_id not in seen:
                info = self._addresses.get(member.device_id) or PeerInfo(
                    device_id=member.device_id, name=member.name, address="",
                    capabilities=Capabilities(cores=0, memory_bytes=0),
                )
                rows.append(PeerStatus(info=info, state="dead", term=term))
        pending = self.enroller.pending() if self.enroller is not None else []
        pending_ids = {p.info.device_id for p in pending}
        pending += [PeerStatus(info=info, state="pending") for device_id, info in self._pending_seen.items()
                    if device_id not in pending_ids and not roster.is_member(device_id)]
        return HouseholdView(
            self_id=self.identity.device_id, term=term, coordinator_id=coordinator,
            roster_version=self.roster.version, peers=tuple(rows + pending),
            links=tuple(PairLink(a=a, b=b, bandwidth_bytes_per_second=link.bandwidth_bytes_per_second,
                                 latency_seconds=link.latency_seconds, measured_by=link.measured_by)
                        for (a, b), link in sorted(self.pair_links().items())),
        )

    async def create_invite(self, ttl: timedelta) -> tuple[str, float]:
        if self.enroller is not None:
            return self.enroller.invite(ttl)
        return await (await self._ca_client()).create_invite(ttl)

    async def list_pending(self) -> list[PeerStatus]:
        if self.enroller is not None:
            return self.enroller.pending()
        return await (await self._ca_client()).list_pending()

    async def approve(self, device_id: DeviceId) -> int:
        if self.enroller is not None:
            return await self.enroller.approve(device_id)
        return await (await self._ca_client()).approve(device_id)

    async def revoke(self, device_id: DeviceId) -> int:
        if self.enroller is not None:
            version = await self.enroller.revoke(device_id)
        else:
            version = await (await self._ca_client()).revoke(device_id)
        self.table.forget(device_id)
        return version

    # -- heartbeats ----------------------------------------------------------------------------------

    def heartbeat(self) -> Heartbeat:
        """What this daemon says about itself in every heartbeat."""
        claim = self.election.adopted
        now = time.monotonic()
        return Heartbeat(
            sender=self.self_info,
            term=self.election.term,
            coordinator_id=claim.coordinator_id if claim else None,
            coordinator_rank=claim.coordinator_rank if claim else 0.0,
            roster_version=self.roster.version,
            alive=tuple(self.table.alive_info(now).values()),
            uptime_s=now - self._started,
            links=tuple(MeasuredLink(peer_id=DeviceId(peer), bandwidth_bytes_per_second=bandwidth,
                                     latency_seconds=latency)
                        for peer, (bandwidth, latency) in sorted(self.links.items())),
        )

    async def run(self) -> None:
        """Heartbeat every peer each interval and advance the election; runs until cancelled."""
        interval = self._detector.heartbeat_interval.total_seconds()
        probes = asyncio.get_running_loop().create_task(self._measure_links(), name="link-probes")
        try:
            while True:
                started = time.monotonic()
                try:
                    await self._heartbeat_round()
                except Exception:  # a bug in one round must not take the daemon's membership down
                    logger.exception("heartbeat round failed; going on")
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
        finally:
            probes.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probes
            for task in self._pulls:
                task.cancel()
            await asyncio.gather(*self._pulls, return_exceptions=True)
            for device_id in list(self._clients):
                self._drop_client(device_id)

    async def _heartbeat_round(self) -> None:
        await self._resolve_static_peers()
        targets = [p for p in self._addresses.values() if p.device_id not in self.roster.roster.revoked]
        if targets:
            await asyncio.gather(*(self._heartbeat_peer(p) for p in targets))
        self.tick()

    def tick(self) -> None:
        """Feed the election the peers that are not dead; log role changes."""
        now = time.monotonic()
        present = self.table.present(now)
        ranks = {device_id: info.capabilities.rank for device_id, info in present.items()
                 if self.roster.roster.is_member(device_id)}
        self.election.tick(now, ranks)
        state = (self.election.role, self.election.term, self.election.coordinator_id)
        if state != self._last_role:
            self._last_role = state
            logger.info("role %s, term %d, coordinator %s", state[0].value, state[1], state[2])

    async def _heartbeat_peer(self, peer: PeerInfo) -> None:
        client = self._client(peer)
        timeout = self._detector.heartbeat_interval * 2
        try:
            reply = await client.heartbeat(self.heartbeat(), timeout=timeout)
        except CetdError as error:
            logger.debug("heartbeat to %s failed: %s", peer.device_id, error)
            return
        if reply.sender.device_id != peer.device_id:
            logger.warning("peer at %s answered as %s, expected %s", peer.address,
                           reply.sender.device_id, peer.device_id)
            return
        self._observe(reply)

    def _observe(self, heartbeat: Heartbeat) -> None:
        now = time.monotonic()
        sender = heartbeat.sender
        if self.roster.roster.is_member(sender.device_id):
            previous = self.table.observe(sender.device_id, sender, now)
            if previous is None or previous is PeerState.DEAD:
                logger.info("peer %s (%s) at %s is alive", sender.device_id, sender.name, sender.address)
            self.reported_links[sender.device_id] = {
                str(link.peer_id): (link.bandwidth_bytes_per_second, link.latency_seconds) for link in heartbeat.links}
        self.note_peer(sender)
        self._pending_seen.pop(sender.device_id, None)
        for info in heartbeat.alive:
            if info.device_id not in self._addresses:
                self.note_peer(info)
        if heartbeat.coordinator_id is not None and heartbeat.term > 0:
            claim = Claim(term=heartbeat.term, coordinator_rank=heartbeat.coordinator_rank,
                          coordinator_id=heartbeat.coordinator_id)
            if self.election.on_claim(claim):
                logger.debug("adopted claim %s from %s", claim, sender.device_id)
        if heartbeat.roster_version > self.roster.version:
            self._spawn_pull(sender)

    async def _measure_links(self, every: timedelta = timedelta(seconds=5)) -> None:
        """Measure the link to one peer at a time over the real mutual-TLS transport (`probe_link`): peers
        never measured first, then round robin. Nothing is measured while a job process runs on either
        device or either times its own speed (the peer refuses the probe): a daemon held to a share of a
        core next to a busy worker or profiler answers late, and the probe would time that instead of the
        link. On the study's testbed the coordinator drives nearly every job, so the loop sees few idle
        moments: in one run it never measured the slowest device's link (hence `measure_missing_links`).
        """
        while True:
            await asyncio.sleep(every.total_seconds())
            alive = self._alive_peers()
            if not alive or self.probe_refusal():
                continue
            candidates = self._unmeasured(alive) or alive
            peer = candidates[self._probe_turn % len(candidates)]
            self._probe_turn += 1
            await self.probe_link(peer)

    async def measure_missing_links(self, device_ids: Iterable[str]) -> None:
        """Before a plan: probe each live peer among ``device_ids`` whose link was never measured, rather than
        plan on a guess (in a household that keeps training, the background probes may not have found a
        moment when both ends were idle)."""
        wanted = set(device_ids)
        for peer in self._unmeasured(p for p in self._alive_peers() if p.device_id in wanted):
            await self.probe_link(peer)

    def pair_links(self) -> dict[tuple[str, str], LinkReading]:
        """Every pair's link: this daemon's probes and those its members reported (`pair_links`)."""
        reported = {str(member): table for member, table in self.reported_links.items()
                    if self.roster.roster.is_member(member)}
        return pair_links(self.identity.device_id, self.links, reported)

    def _alive_peers(self) -> list[PeerInfo]:
        """The peers alive now, in device-ID order."""
        return sorted(self.table.alive_info(time.monotonic()).values(), key=lambda p: p.device_id)

    def _unmeasured(self, peers: Iterable[PeerInfo]) -> list[PeerInfo]:
        """Those of ``peers`` whose link was never measured."""
        return [p for p in peers if p.device_id not in self.links]

    async def probe_link(self, peer: PeerInfo, large: int = 1024 * 1024) -> bool:
        """Probe ``peer`` once and keep the result: latency is half the best round trip of ten tiny probes,
        bandwidth the extra time a 1 MiB probe takes. False when it failed or the peer refused."""
        client = self._client(peer)
        try:
            # The fewest-stalled of ten: a peer held to a share of a core answers some probes late.
            tiny = min([await client.probe(1, 1) for _ in range(10)])
            big = min([await client.probe(large, 1) for _ in range(2)])
        except CetdError as error:
            logger.debug("link probe to %s failed: %s", peer.device_id, error)
            return False
        bandwidth = large / max(big - tiny, 1e-6)
        self.links.add(peer.device_id, bandwidth, tiny / 2)
        best_bandwidth, best_latency = self.links.get(peer.device_id, (0.0, 0.0))
        logger.debug("link to %s: %.1f MB/s, %.2f ms (best of recent probes: %.1f MB/s, %.2f ms)", peer.device_id,
                     bandwidth / 1e6, tiny * 500, best_bandwidth / 1e6, best_latency * 1e3)
        return True

    # -- roster distribution -------------------------------------------------------------------------

    async def publish_roster(self, roster: SignedRoster) -> None:
        """CA holder: push a new roster to every known peer (revoked ones too, so they learn it)."""
        async def push(peer: PeerInfo) -> None:
            try:
                await self._client(peer).push_roster(roster, timeout=timedelta(seconds=2))
            except CetdError as error:
                logger.debug("roster push to %s failed: %s (it will pull it)", peer.device_id, error)

        await asyncio.gather(*(push(p) for p in list(self._addresses.values())))

    def _adopt_roster(self, roster: SignedRoster) -> None:
        if self.roster.accept(roster):
            for device_id in self.roster.roster.revoked:
                self.table.forget(device_id)
                self._pending_seen.pop(device_id, None)
            if self.identity.device_id in self.roster.roster.revoked:
                logger.error("this device was revoked from the household; peers will refuse it")

    def _spawn_pull(self, peer: PeerInfo) -> None:
        if self._pulls:
            return  # one pull at a time is enough: the next heartbeat retries

        async def pull() -> None:
            try:
                self._adopt_roster(await self._client(peer).get_roster())
            except (CetdError, IdentityError) as error:
                logger.warning("roster pull from %s failed: %s", peer.device_id, error)

        task = asyncio.get_running_loop().create_task(pull())
        self._pulls.add(task)
        task.add_done_callback(self._pulls.discard)

    # -- clients -------------------------------------------------------------------------------------

    def _client(self, peer: PeerInfo) -> PeerClient:
        client = self._clients.get(peer.device_id)
        if client is None:
            client = PeerClient(peer.address, tls_server_name(peer.device_id), self.material)
            self._clients[peer.device_id] = client
        return client

    def client_for(self, device_id: DeviceId) -> PeerClient:
        """A client for a known peer; `UnavailableError` when its address is unknown."""
        peer = self._addresses.get(device_id)
        if peer is None:
            raise UnavailableError(f"no address known for device {device_id}")
        return self._client(peer)

    def _drop_client(self, device_id: DeviceId) -> None:
        client = self._clients.pop(device_id, None)
        if client is not None:
            task = asyncio.get_running_loop().create_task(client.close())
            self._pulls.add(task)  # owned and awaited like the pulls
            task.add_done_callback(self._pulls.discard)

    async def _ca_client(self) -> PeerClient:
        for peer in self._addresses.values():
            if peer.enroll_address and self.roster.roster.is_member(peer.device_id):
                return self._client(peer)
        raise UnavailableError(
            "the device holding the household CA is not reachable now; invites, approvals and "
            "revocations need it"
        )

    async def _resolve_static_peers(self) -> None:
        now = time.monotonic()
        for address, next_try in list(self._static.items()):
            if next_try > now:
                continue
            host, _, port = address.rpartition(":")
            try:
                chain = await asyncio.to_thread(fetch_peer_chain, host, int(port), timedelta(seconds=1))
                device_id = device_id_from_certificate(chain[0])
            except (OSError, CetdError, ValueError, IndexError) as error:
                logger.debug("static peer %s not reachable yet: %s", address, error)
                self._static[address] = now + 5.0
                continue
            self._static[address] = now + 60.0
            if device_id not in self._addresses:
                self.note_peer(PeerInfo(device_id=device_id, name="", address=address,
                                        capabilities=Capabilities(cores=0, memory_bytes=0)))

    def _role_of(self, device_id: DeviceId) -> str:
        return "coordinator" if device_id == self.election.coordinator_id else "follower"

    async def close(self) -> None:
        for device_id in list(self._clients):
            client = self._clients.pop(device_id)
            with contextlib.suppress(Exception):
                await client.close()
