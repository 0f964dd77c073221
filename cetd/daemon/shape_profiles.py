"""Each device's times for a job's own layer shapes: measured on the coordinator's request, then cached.

Before it plans a job, the coordinator asks every device it may plan on (`gather_shape_times`): how
long do this model's block, embedding, head and AdamW step take here, at this micro-batch? A device
answers from ``state_dir/profiles/<key>.json`` when it has timed the shape in the last week, else
times it in a fresh job process (`cetd.runtime.profiling`, a one-block copy of the model, seconds) —
but only while no job runs on it, since a measurement beside a running job would be skewed and would
slow that job. Devices are asked in parallel, except those that share one machine (their
`Capabilities.machine` is equal: containers or network namespaces on one kernel): those are asked one
after another, since each would otherwise time the others' measurements. On the bench's testbed (four
such devices at 0.45 of a core on two cores, GPT-2 small's shapes) a block timed on all four at once took
1.39–1.43 ms per sample, timed one device at a time 1.06–1.18 ms on three of them; the plan built on the
first over-predicted a one-device job by 23%, the plan built on the second came within 1%.

What a message over the tensor transport costs (`ShapeTimes.message_seconds`, ``byte_seconds``) does not
depend on the model: every shape profile times the same two messages, against an echo on another device
when one answers (`ShapeProfiles.serve_echo`: any member that neither trains nor measures, or whose own
profile waits for an echo), else against an echo in a second process of this device. A device answers
with the median of its every fresh profile's figures, not the one profile's — of those timed against
another device, where there are any: on the study's testbed one device at a fifth of a core measured
5.2, 8.7 and 11.4 ms per hop in three profiles minutes apart (and a device at 0.4 of a core 1.8 to
3.1 ms), and a tensor-parallel forecast is little else than that figure times its hops. One timing
alone swings as much: four alike devices at 0.45 of a core measured 1.6–3.0 ms per hop, each of them
several times minutes apart, and a slow spell lasts longer than a timing (3 s of messages, in 15
windows, ran high throughout). So while a device has fewer than `TIMINGS` fresh timings, the
coordinator asks it to time them again (``again``) once every device of the machine has answered
(`gather_shape_times`): the first plan of a week already prices its messages at a median of timings
minutes apart, not at whichever spell its one profile fell in.

The block, too, is the median of `TIMINGS` timings minutes apart (`pooled_block`): each time-again times
the shape's block alone (`cetd.runtime.profiling.time_block`; the embedding, head and AdamW step stay
as profiled, in blocks or per parameter) before the transport, and once the transport has its timings
from earlier shapes, the block alone. In the study of 2026-11-27 four alike hosts at 0.45 of a core
profiled OPT-350m's block at 1.93, 2.81, 2.84 and 3.47 ms (the study before: 1.71–2.07), and the
jobs' forecasts followed those one-off figures: heterogeneous GPT-2 large's two hosts at 0.4 of a core
timed 5.11 and 4.91 ms against 3.76 and 3.61, and its tensor and pipeline forecasts came out 33% and
31% high.

A device that cannot answer in time is planned with its reference block scaled by FLOPs
(`cetd.daemon.planning_inputs.scale_block_seconds`), as before. Re-plans after a failure ask the
cache only, so recovery never waits on profiling.

The key covers everything the times depend on: the model's config, the shape, the precision and the
thread count a worker of this device uses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

from cetd.errors import CetdError, JobError, UnavailableError
from cetd.identity import write_file_atomic
from cetd.runtime.spec import JobSpec, ModelDescription, ShapeTimes, from_json, to_json
from cetd.transport.job_types import ProfileAnswer, ProfileQuery
from cetd.transport.peer_info import Capabilities

from .job_process import JobProcess

__all__ = ["EchoFound", "ShapeProfiles", "echo_order", "gather_shape_times", "pooled_block", "pooled_message_costs",
           "shape_key"]

logger = logging.getLogger(__name__)

PROFILES_DIR = "profiles"
REFRESH = timedelta(days=7)
"""A cached measurement older than this is taken again (a device's speed drifts with updates, thermals)."""
MEASURE_TIMEOUT = timedelta(minutes=3)
"""Longest a device spends timing one shape (a fresh process imports torch first)."""
ECHO_TIMEOUT = timedelta(minutes=3)
"""Longest an echo process gets to start (it imports torch; a slow board takes a while) and then to be done:
one for another device's profile, or the profiler's own local echo (`cetd.daemon.worker_main`)."""
ECHO_WAIT = timedelta(seconds=90)
"""Longest a transport profile asks again for an echo while devices refuse only for now (they measure too)."""
ECHO_RETRY_SECONDS = (2.0, 4.0)
"""Pause between those asks, drawn at random so that two devices do not ask each other in lockstep."""
ASK_TIMEOUT = timedelta(minutes=4)
"""Longest the coordinator waits for all devices' answers before planning without the missing ones."""
TIMINGS = 3
"""Fresh timings a device's block and message costs are each the median of, before the coordinator plans on
them."""
RETIMED_DIR = "transport"
"""The profiles folder's subfolder of re-timings, ``<key>-<ns>.json`` (each: the shape's times with its block and
message costs timed again; named when they timed the transport alone)."""


def shape_key(description: ModelDescription, *, micro_batch: int, seq_len: int, precision: str, threads: int) -> str:
    """A file-name-safe digest of everything a shape's times depend on."""
    document = json.dumps({"config": description.config, "task": description.task, "micro_batch": micro_batch,
                           "seq_len": seq_len, "precision": precision, "threads": threads}, sort_keys=True)
    return hashlib.sha256(document.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class EchoFound:
    """What one round of asks for an echo found."""

    peer: tuple[str, str] | None
    """The echo's address and TLS name on another device; None when none would echo."""
    later: bool = False
    """Some device refused only for now (it measures or echoes): asking again later may find it free."""


FindEcho = Callable[[str], Awaitable[EchoFound]]
"""A profile channel's address → the other devices' answers, asked in turn (`EchoFound`)."""


def echo_order(me: str, capabilities: Mapping[str, Capabilities], live: Iterable[str]) -> list[str]:
    """The live devices to ask, in turn, to echo ``me``'s transport profile: those on another machine first
    (a job's hop crosses machines, and an echo sharing this one's CPU would take from what is timed), then
    the fastest by their reference block (unprofiled last), then by device ID.

    The profile times this device's CPU per hop while it waits for each echo, and waiting costs the
    waiting side CPU too (gRPC's threads wake and sleep); in a job the costliest device is the one the
    others wait for, so it waits least, as it does against the fastest echo. A fast device also starts the
    echo's process sooner, which shortens every profile. Before, the echo was the first device by ID: which
    one a device got depended on random identifiers. On the study's testbed the host at a fifth of a core
    timed 3.9–9.6 ms per hop against the host at 0.8 of a core (five runs) and 3.4 and 5.5 ms against a
    host at 0.4 (two runs; `bench.collectives`): the echo's speed does not show above that noise.
    """
    mine = capabilities[me].machine if me in capabilities else ""

    def key(device_id: str) -> tuple[bool, bool, float, str]:
        theirs = capabilities.get(device_id)
        block = theirs.block_seconds if theirs is not None else 0.0
        same = bool(mine) and theirs is not None and theirs.machine == mine
        return same, block <= 0, block, device_id

    return sorted((d for d in set(live) if d != me), key=key)


class ShapeProfiles:
    """This device's side: answers `ProfileQuery` from its cache or by measuring."""

    def __init__(self, state_dir: Path, threads: int, *, busy: Callable[[], bool], enabled: bool = True,
                 me: str = "", remote: Callable[[str], Callable[[ProfileQuery], Awaitable[ProfileAnswer]]] | None = None,
                 host: str = "", find_echo: FindEcho | None = None) -> None:
        """Args:
        state_dir: the daemon's state directory (the cache lives in its ``profiles`` folder).
        threads: the compute threads a worker of this device uses (the measurement uses as many).
        busy: whether a job runs on this device now (then nothing is measured).
        enabled: ``device.profile``; off, this device measures nothing (it still answers from its cache).
        me: this device's ID (answered locally by `gather`).
        remote: device ID → its Profile RPC.
        host: the address this device's job processes listen on (an echo on another device reaches it there).
        find_echo: asks other devices, in turn, to echo a transport profile listening at an address; the
            echo's address and TLS name, or None when none would (then the echo runs on this device).
        """
        self._state_dir = state_dir
        self._dir = state_dir / PROFILES_DIR
        self._log = state_dir / "profile.log"
        self._threads = threads
        self._busy = busy
        self._enabled = enabled
        self._me = me
        self._remote = remote
        self._host = host
        self._find_echo = find_echo
        self._echoes: set[asyncio.Task[None]] = set()
        self.lock = asyncio.Lock()
        """Held while measuring or echoing (here and by the daily reference profiler): one at a time."""
        self._parked = False
        """This device's own profile holds `lock` but waits between asks for an echo: its process idles."""
        self._lent: asyncio.Future[None] | None = None
        """Done when the echo that this device serves while its own profile is parked has ended."""

    def measuring(self) -> bool:
        """Whether this device measures or echoes now (its CPU figures, or another device's, are being taken)."""
        return self.lock.locked() or self._lent is not None

    async def gather(self, devices: Iterable[str], description_json: str, spec: JobSpec, *, measure: bool,
                     machines: Mapping[str, str] | None = None) -> dict[str, ShapeTimes]:
        """The coordinator's side: ``devices``' times for ``spec``'s shapes (`gather_shape_times`); ``machines``
        maps a device ID to its `Capabilities.machine`."""
        query = ProfileQuery(description_json=description_json, micro_batch=spec.global_batch // spec.micro_batches,
                             seq_len=spec.seq_len, precision=spec.precision, measure=measure)

        async def ask(device_id: str, query: ProfileQuery) -> ProfileAnswer:
            if device_id == self._me or self._remote is None:
                return await self.answer(query)
            return await self._remote(device_id)(query)

        return await gather_shape_times(devices, query, ask, machines=machines)

    def cached(self, key: str) -> ShapeTimes | None:
        """The stored times for ``key`` when fresh, else None (a damaged file counts as none)."""
        return _read_fresh(self._dir / f"{key}.json")

    def _pooled(self, key: str, times: ShapeTimes) -> ProfileAnswer:
        """``times`` (shape ``key``'s profile) with its block the median of its fresh timings here
        (`pooled_block`), and the message costs every fresh profile here measured, each the median of them."""
        block, block_samples = pooled_block(self._dir, key, times)
        pooled = pooled_message_costs(self._dir) if times.message_seconds > 0 else None
        if pooled is None:
            return ProfileAnswer(times_json=to_json(block), samples=int(times.message_seconds > 0))
        message, per_byte, samples = pooled
        return ProfileAnswer(times_json=to_json(replace(block, message_seconds=message, byte_seconds=per_byte)),
                             samples=min(samples, block_samples))

    async def answer(self, query: ProfileQuery) -> ProfileAnswer:
        """The times for the query's shape; measured now when asked to, not cached and idle.

        Raises:
            JobError: a malformed query (the description, the shape or the precision).
        """
        description = from_json(ModelDescription, query.description_json)
        if query.micro_batch < 1 or query.seq_len < 2 or query.precision not in ("float32", "float64"):
            raise JobError(f"cannot profile a micro-batch of {query.micro_batch} × {query.seq_len} tokens in "
                           f"{query.precision!r}")
        key = shape_key(description, micro_batch=query.micro_batch, seq_len=query.seq_len,
                        precision=query.precision, threads=self._threads)
        found = self.cached(key)
        if found is None and query.measure and self._enabled and not query.again:
            async with self.lock:
                await self._lent_echo_done()
                found = self.cached(key)  # another request may have measured it meanwhile
                if found is None:
                    if self._busy():
                        return ProfileAnswer(times_json="", reason="a job runs on this device; not profiled now")
                    found = await self._measure(key, query, description)
        if found is None:
            return ProfileAnswer(times_json="", reason="this shape has not been profiled here")
        if query.again and query.measure and self._enabled and found.message_seconds > 0:
            async with self.lock:
                await self._lent_echo_done()
                pooled = self._pooled(key, found)
                if pooled.samples >= TIMINGS or self._busy():
                    return pooled
                timed = pooled_message_costs(self._dir)
                await self._retime(key, found, query, transport=timed is None or timed[2] < TIMINGS)
        return self._pooled(key, found)

    async def _profiler(self, launch: dict[str, object]) -> dict[str, object]:
        """Run a profiler process (`cetd.daemon.worker_main`, role ``profile``), finding it an echo on another
        device when it asks; its ``profiled`` event.

        Raises:
            JobError: the profiler failed or timed out.
        """
        process = JobProcess(name="the shape profiler", log_path=self._log)
        launch = {"role": "profile", "threads": self._threads, "state_dir": str(self._state_dir), **launch}
        if self._find_echo is not None and self._host:
            launch.update(host=self._host, remote_echo=True)
        await process.start(launch)
        try:
            while True:
                event = await process.next_event(MEASURE_TIMEOUT)
                if event.get("event") == "transport" and self._find_echo is not None:
                    peer = await self._wait_for_echo(self._find_echo, str(event.get("address", "")))
                    await process.send({"echo": list(peer) if peer else None})
                elif event.get("event") == "profiled":
                    return event
                elif event.get("event") == "failed":
                    raise JobError(str(event.get("reason", "the shape profiler failed")))
        finally:
            await process.stop()

    async def _retime(self, key: str, shape: ShapeTimes, query: ProfileQuery, *, transport: bool) -> None:
        """Time ``shape``'s block alone once more, then — with ``transport`` — the transport at the share the
        block had; stored beside the profiles (as ``shape`` with the new figures; message costs 0 when not
        timed), where `pooled_block` and `pooled_message_costs` find it. A failure is logged: the device
        answers from the timings it has."""
        started = time.monotonic()
        try:
            event = await self._profiler({"retime": True, "transport": transport, "cpu_share": shape.cpu_share,
                                          "description": json.loads(query.description_json),
                                          "micro_batch": query.micro_batch, "seq_len": query.seq_len,
                                          "precision": query.precision})
            block, costs = event["block"], event["transport"] if transport else {}
            if not isinstance(block, dict) or not isinstance(costs, dict):
                raise TypeError(f"the profiler answered {block!r} for the block and {costs!r} for the transport")
            times = replace(shape, block_seconds=float(block["block_seconds"]), cpu_share=float(block["cpu_share"]),
                            message_seconds=float(costs.get("message_seconds", 0.0)),
                            byte_seconds=float(costs.get("byte_seconds", 0.0)))
        except (JobError, KeyError, TypeError, ValueError) as error:
            logger.warning("the shape's block and the transport were not timed again: %s", error)
            return
        if times.block_seconds <= 0:
            logger.warning("the shape's block timed again at %r s: not kept", times.block_seconds)
            return
        echo = str(event.get("echo", ""))
        folder = self._dir / RETIMED_DIR
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in folder.glob("*.json"):
            if _read_fresh(stale) is None:
                stale.unlink(missing_ok=True)
        write_file_atomic(folder / f"{key}-{time.time_ns()}.json",
                          json.dumps({"times": asdict(times), "at": time.time(), "echo": echo,
                                      "block": True}).encode(), 0o600)
        costs_text = (f"; {times.message_seconds * 1e3:.2f} ms per message hop, {times.byte_seconds * 1e9:.2f} ns "
                      f"per byte (echo: {echo or 'none'})" if transport else "")
        logger.info("timed the block again in %.1f s: %.3f ms per block per sample (its profile: %.3f)%s",
                    time.monotonic() - started, times.block_seconds * 1e3, shape.block_seconds * 1e3, costs_text)

    async def _measure(self, key: str, query: ProfileQuery, description: ModelDescription) -> ShapeTimes:
        started = time.monotonic()
        event = await self._profiler({"description": json.loads(query.description_json),
                                      "micro_batch": query.micro_batch, "seq_len": query.seq_len,
                                      "precision": query.precision})
        times = from_json(ShapeTimes, json.dumps(event["times"]))
        echo = str(event.get("echo", ""))
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_file_atomic(self._dir / f"{key}.json",
                          json.dumps({"times": asdict(times), "at": time.time(), "echo": echo}).encode(), 0o600)
        logger.info("profiled %s (hidden %d, %s) at %d × %d tokens in %.1f s: %.3f ms per block per sample, head "
                    "%.2f blocks, embedding %.2f blocks, AdamW %.2f ns per parameter; %.2f ms per message hop "
                    "(echo: %s)", description.family, description.hidden_size, query.precision, query.micro_batch,
                    query.seq_len, time.monotonic() - started, times.block_seconds * 1e3, times.head_blocks,
                    times.embedding_blocks, times.optimizer_seconds_per_parameter * 1e9, times.message_seconds * 1e3,
                    echo or "none")
        return times

    async def _wait_for_echo(self, find_echo: FindEcho, address: str) -> tuple[str, str] | None:
        """An echo on another device for this device's profile listening at ``address``; None when none would.

        Devices on different machines profile at the same time, and each refuses to echo while it measures
        (`serve_echo`). So while a device refuses only for now, this asks again every few seconds, for up to
        `ECHO_WAIT`. Between asks its own profile is parked — its process idles, holding its listening
        channel — and `serve_echo` may lend this device as an echo meanwhile: two devices that wait for
        each other pair up, and the first one's echo then asks the other in turn. A device never asks and
        echoes at once, so two never echo each other's measurements at the same time.
        """
        deadline = time.monotonic() + ECHO_WAIT.total_seconds()
        while True:
            found = await find_echo(address)
            if found.peer is not None or not found.later:
                return found.peer
            if time.monotonic() >= deadline:
                logger.info("no other device was free to echo the transport profile within %g s; timing it "
                            "against an echo on this device", ECHO_WAIT.total_seconds())
                return None
            self._parked = True
            try:
                await asyncio.sleep(random.uniform(*ECHO_RETRY_SECONDS))
            finally:
                self._parked = False
            await self._lent_echo_done()

    async def _lent_echo_done(self) -> None:
        """Wait for the echo lent while this device's profile was parked, if one runs."""
        while self._lent is not None:
            await asyncio.shield(self._lent)

    async def serve_echo(self, address: str, tls_name: str) -> str:
        """The Echo RPC: answer another device's transport profile listening at ``address`` from an echo
        process here; its address once it listens. The echo holds `lock` until it is done — or, when this
        device's own profile is parked waiting for an echo itself (`_wait_for_echo`), keeps that parked
        until it is done.

        Raises:
            JobError: this device trains or does not profile (an echo beside a job would skew both), or the
                echo did not start.
            UnavailableError: it measures or echoes now; it may echo when asked again later.
        """
        if self._busy() or not self._enabled or not self._host:
            raise JobError("this device trains now or does not profile; not an echo")
        release: Callable[[], None]
        if not self.lock.locked() and self._lent is None:
            await self.lock.acquire()  # free: taken at once, with no other task in between
            release = self.lock.release
        elif self._parked and self._lent is None:
            self._parked = False
            self._lent = asyncio.get_running_loop().create_future()
            release = self._end_lent_echo
        else:
            raise UnavailableError("this device measures or echoes now; ask again later")
        process = JobProcess(name="the transport echo", log_path=self._log)
        try:
            await process.start({"role": "echo", "state_dir": str(self._state_dir), "threads": 1, "host": self._host,
                                 "peer": [address, tls_name]})
            ready = await process.expect("ready", ECHO_TIMEOUT)
        except BaseException:
            await process.stop()
            release()
            raise
        task = asyncio.get_running_loop().create_task(self._finish_echo(process, release), name="transport echo")
        self._echoes.add(task)
        task.add_done_callback(self._echoes.discard)
        return str(ready["address"])

    def _end_lent_echo(self) -> None:
        if self._lent is not None:
            lent, self._lent = self._lent, None
            lent.set_result(None)

    async def _finish_echo(self, process: JobProcess, release: Callable[[], None]) -> None:
        try:
            await process.expect("echoed", ECHO_TIMEOUT)
        except JobError as error:
            logger.warning("the transport echo for another device ended early: %s", error)
        finally:
            await process.stop()
            release()


def pooled_block(directory: Path, key: str, profile: ShapeTimes) -> tuple[ShapeTimes, int]:
    """Shape ``key``'s ``profile`` with its block the median of the profile's and this shape's fresh
    re-timings (`RETIMED_DIR`) in the profiles ``directory`` — its unsplittable part scaled alike, its
    other pieces (in blocks, or per parameter) as profiled — and how many timings that median is of."""
    retimed = [times.block_seconds for times, _, block in
               (_read_record(path) for path in (directory / RETIMED_DIR).glob(f"{key}-*.json"))
               if block and times is not None and times.block_seconds > 0]
    if not retimed or profile.block_seconds <= 0:
        return profile, 1
    block = statistics.median([profile.block_seconds, *retimed])
    scale = block / profile.block_seconds
    return (replace(profile, block_seconds=block, block_fixed_seconds=profile.block_fixed_seconds * scale),
            1 + len(retimed))


def pooled_message_costs(directory: Path) -> tuple[float, float, int] | None:
    """Seconds per hop and per byte as a device answers them, and how many timings they pool: the medians
    over the fresh profiles in its profiles ``directory`` that timed the transport, and its re-timings that
    did (`RETIMED_DIR`) — those timed against an echo on another device, where there are any (a
    lone profile's own figures); None without any."""
    paths = [*directory.glob("*.json"), *(directory / RETIMED_DIR).glob("*.json")]
    found = [_read_record(path) for path in paths]
    timed = [(t, echo) for t, echo, _ in found if t is not None and t.message_seconds > 0]
    remote = [t for t, echo in timed if echo == "remote"]
    measured = remote or [t for t, _ in timed]
    if not measured:
        return None
    return (statistics.median(t.message_seconds for t in measured),
            statistics.median(t.byte_seconds for t in measured), len(measured))


def _read_fresh(path: Path) -> ShapeTimes | None:
    """The times stored in ``path`` when fresh, else None (a damaged file counts as none)."""
    return _read_record(path)[0]


def _read_record(path: Path) -> tuple[ShapeTimes | None, str, bool]:
    """`_read_fresh`, where its transport echo ran (``remote``, ``local``; "" in older files), and whether
    it is a re-timing of the block (a `RETIMED_DIR` file of this version; older ones timed the transport alone)."""
    try:
        data = json.loads(path.read_text())
        if time.time() - float(data["at"]) > REFRESH.total_seconds():
            return None, "", False
        return (from_json(ShapeTimes, json.dumps(data["times"])), str(data.get("echo", "")),
                data.get("block") is True)
    except (OSError, ValueError, KeyError, TypeError, JobError, AttributeError):
        return None, "", False


Ask = Callable[[str, ProfileQuery], Awaitable[ProfileAnswer]]
"""Ask one device (by ID) a `ProfileQuery`: the local `ShapeProfiles.answer` or the device's Profile RPC."""


async def gather_shape_times(devices: Iterable[str], query: ProfileQuery, ask: Ask,
                             timeout: timedelta = ASK_TIMEOUT,
                             machines: Mapping[str, str] | None = None) -> dict[str, ShapeTimes]:
    """Every device's times for the query's shape; those that fail or time out (``timeout`` each) are left out
    (and logged) — the planner then estimates them.

    Devices on different machines are asked in parallel; devices on one machine (equal non-empty
    ``machines`` entries) one after another, in device-ID order. When the query may measure, a device
    whose block or message costs pool fewer than `TIMINGS` timings is then asked to time them again,
    once per round over its machine's devices, until it has them (or answers no more).
    """
    ids = sorted(set(devices))

    async def one(device_id: str, query: ProfileQuery) -> tuple[ShapeTimes | None, int]:
        try:
            reply = await asyncio.wait_for(ask(device_id, query), timeout.total_seconds())
        except (CetdError, OSError, TimeoutError) as error:
            logger.warning("no shape profile from %s: %s", device_id, error or "timed out")
            return None, 0
        if not reply.times_json:
            logger.info("no shape profile from %s: %s", device_id, reply.reason)
            return None, 0
        try:
            return from_json(ShapeTimes, reply.times_json), reply.samples
        except JobError as error:
            logger.warning("no shape profile from %s: %s", device_id, error)
            return None, 0

    groups: dict[str, list[str]] = {}
    for device_id in ids:
        groups.setdefault((machines or {}).get(device_id) or f"device {device_id}", []).append(device_id)

    async def in_turn(group: list[str]) -> dict[str, ShapeTimes | None]:
        answers = {device_id: await one(device_id, query) for device_id in group}
        again = replace(query, again=True)
        stopped: set[str] = set()  # answered no more timings when asked: asked no more
        for _ in range(TIMINGS - 1):
            short = [d for d in group if answers[d][0] is not None and 0 < answers[d][1] < TIMINGS
                     and d not in stopped]
            if not query.measure or not short:
                break
            for device_id in short:
                times, samples = await one(device_id, again)
                if times is None or samples <= answers[device_id][1]:
                    stopped.add(device_id)
                    times, samples = times or answers[device_id][0], answers[device_id][1]
                answers[device_id] = (times, samples)
        return {device_id: times for device_id, (times, _) in answers.items()}

    found: dict[str, ShapeTimes] = {}
    for answers in await asyncio.gather(*(in_turn(group) for group in groups.values())):
        found.update({d: times for d, times in answers.items() if times is not None})
    return found
