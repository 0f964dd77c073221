"""Shape profiles on the daemon's side: measured once in a real job process, cached 0600, refused when busy."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import pytest

from cetd.daemon import shape_profiles
from cetd.daemon.shape_profiles import (
    PROFILES_DIR,
    RETIMED_DIR,
    TIMINGS,
    EchoFound,
    ShapeProfiles,
    gather_shape_times,
    pooled_block,
    pooled_message_costs,
)
from cetd.errors import CetdError, JobError, UnavailableError
from cetd.identity import StateDir, init_household
from cetd.runtime.models.loading import load_model
from cetd.runtime.spec import JobSpec, ShapeTimes, to_json
from cetd.transport.job_types import ProfileAnswer, ProfileQuery


def _description_json() -> str:
    from cetd.runtime.driver import describe_model

    model, _, adapter = load_model("gpt2-tiny", seed=0)
    return to_json(describe_model(model, adapter))


QUERY = ProfileQuery(description_json=_description_json(), micro_batch=2, seq_len=16, precision="float32",
                     measure=True)


@pytest.mark.timeout(180)
def test_a_shape_is_measured_once_then_answered_from_the_cache(tmp_path: Path) -> None:
    init_household(StateDir(tmp_path), "profiler")  # the transport is timed over mutual TLS, as this device
    profiles = ShapeProfiles(tmp_path, threads=1, busy=lambda: False)
    first = asyncio.run(profiles.answer(QUERY))
    times = ShapeTimes(**json.loads(first.times_json))
    assert times.block_seconds > 0
    assert times.optimizer_seconds_per_parameter > 0
    files = list((tmp_path / PROFILES_DIR).glob("*.json"))
    assert len(files) == 1
    assert files[0].stat().st_mode & 0o777 == 0o600
    assert first.samples == 1
    assert times.message_seconds > 0
    # Asked to time it again: a second real timing of the block and of the transport, stored beside the
    # profile; the embedding, head and optimizer are not timed again.
    again = asyncio.run(profiles.answer(replace(QUERY, again=True)))
    assert again.samples == 2
    [timing] = (tmp_path / PROFILES_DIR / RETIMED_DIR).glob("*.json")
    assert timing.name.startswith(files[0].stem + "-")
    assert timing.stat().st_mode & 0o777 == 0o600
    record = json.loads(timing.read_text())
    assert record["block"] is True
    retimed = ShapeTimes(**record["times"])
    assert retimed.block_seconds > 0
    assert retimed.cpu_share > 0
    assert retimed.message_seconds > 0
    assert retimed.byte_seconds >= 0
    unchanged = ("embedding_blocks", "head_blocks", "optimizer_seconds_per_parameter", "block_fixed_seconds")
    assert [getattr(retimed, name) for name in unchanged] == [getattr(times, name) for name in unchanged]
    # Two timings: the block answered is their median (their mean), its unsplittable part scaled alike.
    answered = _times(again)
    assert answered.block_seconds == pytest.approx((times.block_seconds + retimed.block_seconds) / 2)
    assert answered.block_fixed_seconds == pytest.approx(
        times.block_fixed_seconds * answered.block_seconds / times.block_seconds)
    assert list((tmp_path / PROFILES_DIR).glob("*.json")) == files
    # Busy now, and profiling off on a second instance: both still answer from the cache (message costs:
    # the median of the two timings), and time nothing again.
    busy = ShapeProfiles(tmp_path, threads=1, busy=lambda: True, enabled=False)
    assert asyncio.run(busy.answer(QUERY)).times_json == again.times_json
    assert asyncio.run(busy.answer(replace(QUERY, again=True))) == again
    assert asyncio.run(ShapeProfiles(tmp_path, threads=1, busy=lambda: True).answer(
        replace(QUERY, again=True))) == again
    # Another thread count is another measurement: not in the cache, and this device is busy.
    other = ShapeProfiles(tmp_path, threads=2, busy=lambda: True)
    refused = asyncio.run(other.answer(QUERY))
    assert refused.times_json == ""
    assert "a job runs on this device" in refused.reason


def test_profiling_off_or_cache_only_measures_nothing(tmp_path: Path) -> None:
    off = ShapeProfiles(tmp_path, threads=1, busy=lambda: False, enabled=False)
    assert asyncio.run(off.answer(QUERY)).reason == "this shape has not been profiled here"
    on = ShapeProfiles(tmp_path, threads=1, busy=lambda: False)
    assert asyncio.run(on.answer(replace(QUERY, measure=False))).times_json == ""
    assert not (tmp_path / PROFILES_DIR).exists()


def test_a_damaged_cache_file_counts_as_none(tmp_path: Path) -> None:
    profiles = ShapeProfiles(tmp_path, threads=1, busy=lambda: True)
    (tmp_path / PROFILES_DIR).mkdir()
    for key in ("a", "b"):
        (tmp_path / PROFILES_DIR / f"{key}.json").write_text("{not json")
    assert profiles.cached("a") is None
    assert profiles.cached("missing") is None


def _store(directory: Path, key: str, times: ShapeTimes, age: timedelta = timedelta(0), echo: str | None = None,
           *, block: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stored: dict[str, object] = {"times": asdict(times), "at": time.time() - age.total_seconds()}
    if echo is not None:
        stored["echo"] = echo
    if block:
        stored["block"] = True
    (directory / f"{key}.json").write_text(json.dumps(stored))


def _times(answer: ProfileAnswer) -> ShapeTimes:
    return ShapeTimes(**json.loads(answer.times_json))


def test_message_costs_are_the_median_of_every_fresh_profile_here(tmp_path: Path) -> None:
    profiles = ShapeProfiles(tmp_path, threads=1, busy=lambda: True)
    directory = tmp_path / PROFILES_DIR
    base = ShapeTimes(block_seconds=1e-3, embedding_blocks=0.1, head_blocks=1.0, optimizer_seconds_per_parameter=1e-9)
    # This shape's own profile met a slow moment (11 ms a hop); two other shapes' profiles took 5 and 8 ms.
    _store(directory, "a", replace(base, message_seconds=11e-3, byte_seconds=20e-9))
    _store(directory, "b", replace(base, block_seconds=2e-3, message_seconds=5e-3, byte_seconds=16e-9))
    _store(directory, "c", replace(base, message_seconds=8e-3, byte_seconds=18e-9))
    _store(directory, "stale", replace(base, message_seconds=1.0, byte_seconds=1.0), age=timedelta(days=8))
    _store(directory, "unmeasured", base)  # its transport was not profiled: 0, not a cost
    (directory / "damaged.json").write_text("{not json")
    # A transport-only timing of shape "a" pools like a profile: 5, 8, 11 and 12 ms.
    _store(directory / RETIMED_DIR, "a-1", replace(base, message_seconds=12e-3, byte_seconds=30e-9))
    pooled = profiles._pooled("a", profiles.cached("a") or base)
    assert pooled_message_costs(directory) == (pytest.approx(9.5e-3), pytest.approx(19e-9), 4)
    assert pooled.samples == 1  # the fewer of the two counts: shape "a"'s block was timed once
    # The shape's own block time kept.
    times = _times(pooled)
    assert replace(times, message_seconds=0.0, byte_seconds=0.0) == base
    assert (times.message_seconds, times.byte_seconds) == pytest.approx((9.5e-3, 19e-9))
    # A profile without a transport measurement stays without one; a lone profile keeps its own figures.
    assert profiles._pooled("a", base) == ProfileAnswer(times_json=to_json(base), samples=0)
    alone = ShapeProfiles(tmp_path / "alone", threads=1, busy=lambda: True)
    _store(tmp_path / "alone" / PROFILES_DIR, "a", replace(base, message_seconds=11e-3))
    lone = alone._pooled("a", replace(base, message_seconds=11e-3))
    assert (_times(lone).message_seconds, lone.samples) == (11e-3, 1)


def test_a_block_is_the_median_of_its_shapes_fresh_timings(tmp_path: Path) -> None:
    directory = tmp_path / PROFILES_DIR
    profile = ShapeTimes(block_seconds=3.47e-3, block_fixed_seconds=1.0e-3, embedding_blocks=0.1, head_blocks=1.5,
                         optimizer_seconds_per_parameter=1e-9, message_seconds=2e-3, cpu_share=0.45)
    _store(directory, "a", profile)
    assert pooled_block(directory, "a", profile) == (profile, 1)
    retimed = directory / RETIMED_DIR
    # Timed again twice (one of them the block alone: no message costs); an older version's re-timing of the
    # transport alone, a stale one, a damaged one and another shape's are not this block's timings.
    _store(retimed, "a-1", replace(profile, block_seconds=2.10e-3, message_seconds=0.0), block=True)
    _store(retimed, "a-2", replace(profile, block_seconds=2.30e-3, cpu_share=0.44), block=True)
    _store(retimed, "a-3", replace(profile, block_seconds=9.0e-3))
    _store(retimed, "a-4", replace(profile, block_seconds=1.0e-3), age=timedelta(days=8), block=True)
    (retimed / "a-5.json").write_text("[]")
    _store(retimed, "b-1", replace(profile, block_seconds=1.0e-3), block=True)
    block, samples = pooled_block(directory, "a", profile)
    assert samples == 3
    assert block == replace(profile, block_seconds=2.30e-3, block_fixed_seconds=pytest.approx(1.0e-3 * 2.30 / 3.47))
    # The answer: the pooled block; the messages' median counts the re-timings that timed them (2 of 2 ms,
    # 9 ms); the fewer of the two counts.
    answer = ShapeProfiles(tmp_path, threads=1, busy=lambda: True)._pooled("a", profile)
    assert _times(answer).block_seconds == 2.30e-3
    assert (_times(answer).message_seconds, answer.samples) == (2e-3, 3)


def test_message_costs_timed_against_another_device_are_preferred(tmp_path: Path) -> None:
    # Against an echo in a second process of this device, both ends share its CPU (on the study's testbed,
    # 1.5-2 ms per round trip at each end at a fifth of a core, against 0.8-1.2 with the echo elsewhere):
    # once a profile was timed against another device, the ones timed here are left out of the median.
    profiles = ShapeProfiles(tmp_path, threads=1, busy=lambda: True)
    directory = tmp_path / PROFILES_DIR
    base = ShapeTimes(block_seconds=1e-3, embedding_blocks=0.1, head_blocks=1.0, optimizer_seconds_per_parameter=1e-9,
                      message_seconds=9e-3, byte_seconds=20e-9)
    _store(directory, "old", base)  # written before the echo was recorded
    _store(directory, "here", replace(base, message_seconds=10e-3), echo="local")
    assert _times(profiles._pooled("a", base)).message_seconds == 9.5e-3
    _store(directory, "remote", replace(base, message_seconds=5e-3, byte_seconds=7e-9), echo="remote")
    pooled = profiles._pooled("a", base)
    assert (_times(pooled), pooled.samples) == (replace(base, message_seconds=5e-3, byte_seconds=7e-9), 1)


def test_an_echo_is_refused_while_this_device_trains_measures_or_does_not_profile(tmp_path: Path) -> None:
    async def refusal(profiles: ShapeProfiles, hold: bool = False) -> CetdError:
        if hold:
            await profiles.lock.acquire()
        with pytest.raises(CetdError) as refused:
            await profiles.serve_echo("127.0.0.1:1", "device.cetd.invalid")
        return refused.value

    training = asyncio.run(refusal(ShapeProfiles(tmp_path, threads=1, busy=lambda: True, host="127.0.0.1")))
    assert isinstance(training, JobError)
    assert "trains now" in str(training)
    # Measuring is a refusal for now only: the caller may ask again (`UnavailableError`).
    measuring = asyncio.run(refusal(ShapeProfiles(tmp_path, threads=1, busy=lambda: False, host="127.0.0.1"),
                                    hold=True))
    assert isinstance(measuring, UnavailableError)
    assert "measures or echoes now" in str(measuring)
    off = asyncio.run(refusal(ShapeProfiles(tmp_path, threads=1, busy=lambda: False, enabled=False,
                                            host="127.0.0.1")))
    assert isinstance(off, JobError)
    assert "does not profile" in str(off)
    assert not (tmp_path / "profile.log").exists(), "no echo process was started"


class _EchoProcess:
    """Stands in for the echo's job process: ready at once, echoed when the test says (`finish`)."""

    started: list[_EchoProcess] = []

    def __init__(self, name: str, log_path: Path) -> None:
        self.finish = asyncio.Event()
        self.stopped = False
        _EchoProcess.started.append(self)

    async def start(self, launch: dict[str, object]) -> None:
        assert launch["role"] == "echo"

    async def expect(self, event: str, timeout: timedelta) -> dict[str, object]:
        if event == "echoed":
            await self.finish.wait()
        return {"event": event, "address": "127.0.0.1:9"}

    async def stop(self) -> None:
        self.stopped = True


def test_a_profile_waiting_for_an_echo_asks_again_and_lends_this_device_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Devices on different machines profile at once and refuse to echo while they measure. One whose profile
    # waits for an echo asks again every few seconds, and meanwhile echoes for another device that asks it:
    # two that wait for each other pair up — but a device never asks and echoes at the same time.
    monkeypatch.setattr(shape_profiles, "ECHO_RETRY_SECONDS", (0.05, 0.05))
    monkeypatch.setattr(shape_profiles, "JobProcess", _EchoProcess)
    _EchoProcess.started = []
    profiles = ShapeProfiles(tmp_path, threads=1, busy=lambda: False, host="127.0.0.1")
    asks: list[bool] = []
    asked = asyncio.Event()

    async def find_echo(address: str) -> EchoFound:
        asks.append(profiles.measuring() and profiles._lent is None)  # asking while lent would be a bug
        asked.set()
        if len(asks) < 3:
            return EchoFound(None, later=True)
        return EchoFound(("127.0.0.1:7", "peer.cetd.invalid"))

    async def scenario() -> tuple[str, str] | None:
        async with profiles.lock:  # as `answer` holds it while measuring
            waiting = asyncio.create_task(profiles._wait_for_echo(find_echo, "127.0.0.1:5"))
            await asked.wait()
            assert profiles._parked, "refused for now: parked until it asks again"
            assert await profiles.serve_echo("127.0.0.1:6", "other.cetd.invalid") == "127.0.0.1:9"
            assert profiles.measuring()
            with pytest.raises(UnavailableError, match="measures or echoes now"):  # one echo at a time
                await profiles.serve_echo("127.0.0.1:8", "third.cetd.invalid")
            await asyncio.sleep(0.3)
            assert len(asks) == 1, "no ask while this device echoes"
            _EchoProcess.started[0].finish.set()
            peer = await waiting
        return peer

    assert asyncio.run(scenario()) == ("127.0.0.1:7", "peer.cetd.invalid")
    assert asks == [True, True, True]
    assert len(_EchoProcess.started) == 1
    assert _EchoProcess.started[0].stopped
    assert not profiles.measuring()


def test_a_profile_stops_asking_for_an_echo_when_none_would_or_after_the_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(shape_profiles, "ECHO_RETRY_SECONDS", (0.05, 0.05))
    profiles = ShapeProfiles(tmp_path, threads=1, busy=lambda: False, host="127.0.0.1")
    asks: list[str] = []

    def answering(found: EchoFound) -> shape_profiles.FindEcho:
        async def find_echo(address: str) -> EchoFound:
            asks.append(address)
            return found
        return find_echo

    # Refused for good (they train, or there is nobody else): one round of asks, then the echo here.
    assert asyncio.run(profiles._wait_for_echo(answering(EchoFound(None)), "a")) is None
    assert asks == ["a"]
    # Refused for now, again and again: asks until `ECHO_WAIT` has passed.
    monkeypatch.setattr(shape_profiles, "ECHO_WAIT", timedelta(seconds=0.3))
    caplog.set_level(logging.INFO, logger=shape_profiles.__name__)
    started = time.monotonic()
    assert asyncio.run(profiles._wait_for_echo(answering(EchoFound(None, later=True)), "b")) is None
    assert 0.3 <= time.monotonic() - started < 2.0
    assert 3 <= asks.count("b") <= 8
    assert "no other device was free to echo the transport profile within 0.3 s" in caplog.text


@pytest.mark.parametrize(("change", "message"), [
    ({"description_json": "{}"}, "malformed ModelDescription"),
    ({"micro_batch": 0}, "cannot profile a micro-batch of 0"),
    ({"precision": "int8"}, "cannot profile"),
])
def test_a_malformed_query_is_refused_with_its_reason(tmp_path: Path, change: dict[str, object],
                                                      message: str) -> None:
    profiles = ShapeProfiles(tmp_path, threads=1, busy=lambda: False)
    with pytest.raises(JobError, match=message):
        asyncio.run(profiles.answer(replace(QUERY, **change)))


def test_gather_keeps_the_devices_that_answered() -> None:
    good = ShapeTimes(block_seconds=1e-3, embedding_blocks=0.1, head_blocks=2.0, optimizer_seconds_per_parameter=1e-9)

    async def ask(device_id: str, query: ProfileQuery) -> ProfileAnswer:
        if device_id == "down":
            raise UnavailableError("device down is not reachable")
        if device_id == "slow":
            await asyncio.sleep(10)
        if device_id == "garbled":
            return ProfileAnswer(times_json="[1, 2]")
        if device_id == "busy":
            return ProfileAnswer(times_json="", reason="a job runs on this device")
        return ProfileAnswer(times_json=json.dumps(asdict(good)))

    found = asyncio.run(gather_shape_times(["ok", "down", "slow", "garbled", "busy"], QUERY, ask,
                                           timeout=timedelta(seconds=0.5)))
    assert found == {"ok": good}


def test_the_coordinator_answers_itself_and_asks_the_others(tmp_path: Path) -> None:
    asked: list[str] = []

    def remote(device_id: str) -> Callable[[ProfileQuery], Awaitable[ProfileAnswer]]:
        async def call(query: ProfileQuery) -> ProfileAnswer:
            asked.append(device_id)
            return ProfileAnswer(times_json="", reason="not profiled")
        return call

    profiles = ShapeProfiles(tmp_path, threads=1, busy=lambda: True, me="me", remote=remote)
    spec = JobSpec(model="gpt2-tiny", data="d.jsonl", global_batch=8, micro_batches=4, seq_len=16)
    assert asyncio.run(profiles.gather(["me", "a", "b"], QUERY.description_json, spec, measure=True)) == {}
    assert sorted(asked) == ["a", "b"]


def test_devices_on_one_machine_are_asked_one_at_a_time_and_machines_in_parallel() -> None:
    good = ShapeTimes(block_seconds=1e-3, embedding_blocks=0.1, head_blocks=2.0, optimizer_seconds_per_parameter=1e-9)
    machines = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "b2": "B", "lone": "", "unknown": ""}
    running: dict[str, int] = {}
    most: dict[str, int] = {}
    overall: list[int] = []

    async def ask(device_id: str, query: ProfileQuery) -> ProfileAnswer:
        machine = machines[device_id] or device_id
        running[machine] = running.get(machine, 0) + 1
        most[machine] = max(most.get(machine, 0), running[machine])
        overall.append(sum(running.values()))
        await asyncio.sleep(0.05)
        running[machine] -= 1
        if device_id == "a2":
            raise UnavailableError("device a2 is not reachable")  # the next device of its machine is still asked
        return ProfileAnswer(times_json=json.dumps(asdict(good)))

    found = asyncio.run(gather_shape_times(list(machines), QUERY, ask, machines=machines))
    assert set(found) == set(machines) - {"a2"}
    assert most == {"A": 1, "B": 1, "lone": 1, "unknown": 1}
    # A, B and the two devices of no known machine each had one measurement running at once.
    assert max(overall) == 4


def test_a_device_with_too_few_transport_timings_is_asked_to_time_it_again_in_rounds() -> None:
    # Two devices on machine A, one on B. "a1" has one timing and times one more each time it is asked;
    # "a2" has all it needs; "b1" has one, and then answers no more (its device began training).
    good = ShapeTimes(block_seconds=1e-3, embedding_blocks=0.1, head_blocks=2.0, optimizer_seconds_per_parameter=1e-9,
                      message_seconds=2e-3)
    machines = {"a1": "A", "a2": "A", "b1": "B"}
    samples = {"a1": 1, "a2": TIMINGS, "b1": 1}
    asked: list[tuple[str, bool]] = []

    async def ask(device_id: str, query: ProfileQuery) -> ProfileAnswer:
        asked.append((device_id, query.again))
        if query.again:
            if device_id == "b1":
                return ProfileAnswer(times_json="", reason="a job runs on this device; not profiled now")
            samples[device_id] += 1
        times = replace(good, message_seconds=good.message_seconds * samples[device_id])
        return ProfileAnswer(times_json=json.dumps(asdict(times)), samples=samples[device_id])

    found = asyncio.run(gather_shape_times(list(machines), QUERY, ask, machines=machines))
    assert samples == {"a1": TIMINGS, "a2": TIMINGS, "b1": 1}
    # Each device's latest answer; b1's shape answer stands when it times no more.
    every = replace(good, message_seconds=2e-3 * TIMINGS)
    assert found == {"a1": every, "a2": every, "b1": good}
    on_a = [entry for entry in asked if entry[0] != "b1"]
    assert on_a == [("a1", False), ("a2", False)] + [("a1", True)] * (TIMINGS - 1)
    assert [entry for entry in asked if entry[0] == "b1"] == [("b1", False), ("b1", True)]
    # A query that may not measure asks each device once, whatever its timings.
    asked.clear()
    asyncio.run(gather_shape_times(list(machines), replace(QUERY, measure=False), ask, machines=machines))
    assert sorted(asked) == [("a1", False), ("a2", False), ("b1", False)]
