"""One benchmark job: `cetctl train` on the testbed, its step events metered, its outcome summarised.

The job is submitted from device 0 with the real ``cetctl --json train``. While its JSON lines arrive,
every step event is stamped with a `Reading` of the devices' CPU-seconds and link bytes. Step 1 pays
for worker start-up, weight distribution and first-touch allocations, so the steady-state figures use
steps 2..N only. N is the run's ``steps``, raised where the plan's forecast (`cetctl plan`, asked first)
says steps 2..N would take less than ``JobSettings.min_window``: a steady state of four 0.15 s steps
was over before a spell of the shared machine (seconds long) had passed, and the same job measured
0.0045 s/sample in one study and about 0.0066 in the one before.

- ``seconds_per_sample``: Σ step seconds / Σ samples over steps 2..N (the driver's step times);
- ``bench_joules_per_sample``: the bench's own energy model over the same window, from metered
  quantities — for each device of the plan: idle W × window wall time + W per busy core × its cgroup's
  CPU-seconds + its link bytes × J/byte, with the ``jetson-nano`` power profile on its CPU
  (`cetd.cluster.power`), plus the driver's CPU-seconds and bytes on the submitting device; a model.

The product's own figures (``seconds_per_sample``, ``joules_per_sample`` with its ``energy_source``,
both over every step) and the plan's predictions are kept as reported, with, per host, what the forecast
asked first has it busy for a step beside what it was (its CPU-seconds per step over its CPU fraction),
the block time it used, and the forecast's bottleneck and notes: where a forecast misses, they show
which device's figures or which part of the step it got wrong. A job the planner refuses
for memory (exit 65 before any step, with the planner's sentence) is ``refused``; a job killed by the kernel's OOM
killer inside a device's cgroup is ``oom``.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cetd.cluster.power import BUILTIN_PROFILES, DeviceUsage, EnergyModel
from cetd.daemon.shape_profiles import PROFILES_DIR, pooled_message_costs

from .testbed import Reading, Testbed

ENERGY_PROFILE = BUILTIN_PROFILES["jetson-nano"]
"""The paper's device class; its CPU figures (the bench trains on CPUs, so no accelerator watts)."""

REFUSED_EXIT = 65
_MEMORY_REFUSAL = re.compile(r"to train on one device|whole model on every device|fits in the devices' memory")
"""The planner's two refusals for memory (`cetd.cluster.planner`): the model, or no plan, fits."""
SUBMITTER = 0
"""The host whose daemon every job is submitted to (and so runs the job's driver)."""
MISS = 0.2
"""The forecast error the study holds each job to (issue 5: predicted step time within 20% of measured)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSettings:
    """The shape of every job of a run (scaled from the paper's batch 128, sequence 32)."""

    steps: int
    global_batch: int
    micro_batches: int
    seq_len: int
    timeout: timedelta
    min_window: timedelta = timedelta(0)
    """Least forecast wall time of the steady state (steps 2..N): ``steps`` is raised to reach it."""
    max_steps: int = 200
    """Most steps ``min_window`` may raise a job to."""

    def steps_for(self, step_seconds: float | None) -> int:
        """Steps for a job forecast at ``step_seconds`` a step: ``steps``, or more so that steps 2..N last
        ``min_window`` (at most `max_steps`); ``steps`` without a forecast."""
        if not step_seconds or step_seconds <= 0:
            return self.steps
        needed = math.ceil(self.min_window.total_seconds() / step_seconds) + 1
        return max(self.steps, min(self.max_steps, needed))


@dataclass(slots=True, kw_only=True)
class JobOutcome:
    """What one model × parallelism × device set produced."""

    model: str
    parallelism: str
    device_set: str
    status: str
    """``ok``; ``refused`` (the planner: it fits no device's memory, the paper's OOM); ``oom`` (the kernel's OOM
    killer, in a device's cgroup); ``failed`` (any other error) or ``timeout``."""
    reason: str = ""
    seconds_per_sample: float | None = None
    """Steady state (steps 2..N), from the driver's step times."""
    bench_joules_per_sample: float | None = None
    """Steady state, the bench's energy model over metered CPU-seconds and bytes (see the module doc)."""
    bench_energy_source: str = ""
    product_seconds_per_sample: float | None = None
    """As `cetctl` reports it (every step, start-up included)."""
    product_joules_per_sample: float | None = None
    energy_source: str = ""
    """The product's label for its joules."""
    predicted_seconds_per_sample: float | None = None
    predicted_joules_per_sample: float | None = None
    estimated_memory_bytes: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    """Steps submitted (`JobSettings.steps_for` the forecast)."""
    speed_sources: dict[str, str] = field(default_factory=dict)
    """Per device ID: where the plan's speed for it came from (``measured``: the job's own shapes)."""
    workers: list[dict[str, Any]] = field(default_factory=list)
    """Per worker: host, CPU fraction, stage/blocks, tensor and data indices."""
    cpu_seconds: list[float] = field(default_factory=list)
    """Per host, over the steady-state window."""
    bytes_sent: list[int] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    """Submission to the final line."""
    memory_peak_bytes: list[int] = field(default_factory=list)
    """Per host cgroup, the peak so far in this device set (cumulative, not reset per job)."""
    links: dict[int, list[float]] = field(default_factory=dict)
    """Host → [MB/s, ms]: the submitting device's link estimates just before the job (what its plan used,
    as the submitter coordinates), from `cetctl peers`."""
    message_ms: list[float | None] = field(default_factory=list)
    """Per host, the milliseconds per message hop its profiles answered the plan (`pooled_message_costs`),
    read after the job; None where none was measured."""
    message_ns_per_byte: list[float | None] = field(default_factory=list)
    """Per host, the nanoseconds each byte adds to a hop, read with ``message_ms``."""
    forecast_busy_seconds: list[float | None] = field(default_factory=list)
    """Per host, the seconds of one step the plan's forecast (`cetctl plan`, asked before the job) has the
    device busy; None for a host the plan leaves out. Beside `busy_seconds`, it shows which device's
    figures a missed forecast got wrong."""
    forecast_block_ms: list[float | None] = field(default_factory=list)
    """Per host, the milliseconds per sample of one block that forecast used (its shape profile)."""
    forecast_bottleneck: str = ""
    """The host (``host N``) or link that forecast says sets the pace."""
    forecast_notes: list[str] = field(default_factory=list)
    """That forecast's notes: its collectives', optimizer's and driver's seconds per step."""
    busy_seconds: list[float | None] = field(default_factory=list)
    """Per host, measured: its CPU-seconds per steady-state step over its CPU fraction (the wall time that
    CPU takes at its cap; a device at its step time was never idle)."""
    repeats: list[tuple[float | None, float | None]] = field(default_factory=list)
    """The same job submitted again in each later pass over the device set (a fresh plan from the same
    household, tens of minutes after the first): per pass, its measured and its predicted steady-state
    s/sample (None where that run produced none)."""

    @property
    def prediction_error(self) -> float | None:
        """The first run's predicted over its measured steady-state s/sample, minus one."""
        return _excess(self.predicted_seconds_per_sample, self.seconds_per_sample)

    @property
    def runs(self) -> list[tuple[float, float]]:
        """Every run's (measured, predicted) s/sample, the first run's first; runs missing either are left out."""
        every = [(self.seconds_per_sample, self.predicted_seconds_per_sample), *self.repeats]
        return [(measured, predicted) for measured, predicted in every if measured and predicted]

    @property
    def pooled_error(self) -> float | None:
        """The runs' mean predicted over their mean measured s/sample, minus one: the forecast against the
        job's step time as measured over runs tens of minutes apart, not in one spell of the machine."""
        runs = self.runs
        if not runs:
            return None
        return _excess(sum(p for _, p in runs) / len(runs), sum(m for m, _ in runs) / len(runs))

    @property
    def spread(self) -> float | None:
        """The slowest run's measured s/sample over the fastest's, minus one: how far the same job on the
        same devices moved between runs, which no forecast made before them can follow. None for one run."""
        measured = [m for m, _ in self.runs]
        return max(measured) / min(measured) - 1 if len(measured) > 1 else None


def _excess(value: float | None, reference: float | None) -> float | None:
    """``value`` over ``reference``, minus one; None where either is missing or zero."""
    return value / reference - 1 if value and reference else None


def _reader(stream: Any, lines: list[tuple[float, str]], testbed: Testbed, readings: list[Reading]) -> None:
    for line in stream:
        if line.strip():
            if '"event": "step"' in line:
                readings.append(testbed.read())
            lines.append((time.monotonic(), line))


def run_job(testbed: Testbed, *, model: str, folder: Path, data: Path, parallelism: str,
            settings: JobSettings) -> JobOutcome:
    """Train one job on the testbed from device 0 and summarise it."""
    devices = "1" if parallelism == "single" else str(len(testbed.household.daemons))
    job = ("--model", str(folder), "--data", str(data), "--batch", str(settings.global_batch),
           "--micro-batches", str(settings.micro_batches), "--seq-len", str(settings.seq_len),
           "--parallelism", parallelism, "--devices", devices, "--seed", "0")
    forecast = _forecast(testbed, job, settings)
    steps = settings.steps_for(forecast["seconds_per_sample"] * settings.global_batch if forecast else None)
    links = _links(testbed)
    oom_before = testbed.oom_kills()
    started = time.monotonic()
    readings: list[Reading] = []
    lines: list[tuple[float, str]] = []
    process = testbed.cetctl(SUBMITTER, "train", *job, "--steps", str(steps), "--checkpoint-every", str(steps + 1))
    reader = threading.Thread(target=_reader, args=(process.stdout, lines, testbed, readings), daemon=True)
    reader.start()
    outcome = JobOutcome(model=model, parallelism=parallelism, device_set=testbed.device_set.name, status="failed",
                         links=links, steps=steps)
    if forecast:
        _keep_forecast(outcome, testbed, forecast)
    try:
        process.wait(timeout=settings.timeout.total_seconds())
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        outcome.status = "timeout"
        outcome.reason = f"no result within {settings.timeout.total_seconds():.0f} s"
    reader.join(timeout=10)
    stderr = process.stderr.read().strip() if process.stderr else ""
    outcome.wall_seconds = time.monotonic() - started
    outcome.memory_peak_bytes = testbed.memory_peaks()
    outcome.message_ms, outcome.message_ns_per_byte = _message_costs(testbed)
    events = [json.loads(text) for _, text in lines]
    _summarise(outcome, testbed, events, readings, settings)
    if outcome.status == "timeout":
        _cancel_running(testbed, events)
        return outcome
    if testbed.oom_kills() > oom_before:
        outcome.status, outcome.reason = "oom", stderr or "a process of the job was killed by the OOM killer"
    elif process.returncode == 0:
        outcome.status = "ok"
    elif process.returncode == REFUSED_EXIT and not outcome.step_seconds and _MEMORY_REFUSAL.search(stderr):
        outcome.status, outcome.reason = "refused", stderr
    else:
        outcome.reason = stderr or f"cetctl exited with {process.returncode}"
    return outcome


def _forecast(testbed: Testbed, job: tuple[str, ...], settings: JobSettings) -> dict[str, Any] | None:
    """The plan's forecast for ``job`` (`cetctl plan`'s ``prediction``, which profiles the shapes as a
    submission would); None where there is no window to reach or the planner gives no plan (a refusal
    shows in the job)."""
    if not settings.min_window:
        return None
    process = testbed.cetctl(SUBMITTER, "plan", *job)
    try:
        text, _ = process.communicate(timeout=settings.timeout.total_seconds())
        prediction = json.loads(text)["prediction"]
        float(prediction["seconds_per_sample"])
    except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        process.kill()
        process.wait()
        return None
    return dict(prediction)


def _keep_forecast(outcome: JobOutcome, testbed: Testbed, prediction: dict[str, Any]) -> None:
    """Per host, the busy seconds and block time ``prediction`` used, and its bottleneck, by host."""
    def per_host(by_device: dict[str, Any] | None, scale: float) -> list[float | None]:
        values: list[float | None] = [None] * len(testbed.household.daemons)
        for device_id, value in (by_device or {}).items():
            if device_id in testbed.host_of_device:
                values[testbed.host_of_device[device_id]] = round(float(value) * scale, 4)
        return values

    outcome.forecast_busy_seconds = per_host(prediction.get("busy_seconds"), 1.0)
    outcome.forecast_block_ms = per_host(prediction.get("block_seconds"), 1e3)

    def by_host(text: str) -> str:
        for device_id, host in testbed.host_of_device.items():
            text = text.replace(device_id, f"host {host}")
        return text

    outcome.forecast_bottleneck = by_host(str(prediction.get("bottleneck", "")))
    outcome.forecast_notes = [by_host(str(note)) for note in prediction.get("notes") or ()]


def _links(testbed: Testbed) -> dict[int, list[float]]:
    """The submitter's measured links (host → [MB/s, ms]); empty when `cetctl peers` fails."""
    process = testbed.cetctl(SUBMITTER, "peers")
    try:
        text, _ = process.communicate(timeout=60)
        peers = json.loads(text)["peers"]
    except (subprocess.TimeoutExpired, ValueError, KeyError):
        process.kill()
        return {}
    return {testbed.host_of_device[p["device_id"]]: [round(p["link"]["bandwidth_bytes_per_second"] / 1e6, 1),
                                                     round(p["link"]["latency_seconds"] * 1e3, 3)]
            for p in peers if p["device_id"] in testbed.host_of_device and p["link"]["bandwidth_bytes_per_second"]}


def _message_costs(testbed: Testbed) -> tuple[list[float | None], list[float | None]]:
    """Per host, the pooled milliseconds per hop and nanoseconds per byte (None where none was measured)."""
    hosts: list[float | None] = [None] * len(testbed.household.daemons)
    per_byte: list[float | None] = [None] * len(testbed.household.daemons)
    for daemon in testbed.household.daemons:
        pooled = pooled_message_costs(daemon.state_dir / PROFILES_DIR)
        if pooled is not None:
            host = testbed.host_of_device[str(daemon.device_id)]
            hosts[host], per_byte[host] = round(pooled[0] * 1e3, 3), round(pooled[1] * 1e9, 3)
    return hosts, per_byte


def _cancel_running(testbed: Testbed, events: list[dict[str, Any]]) -> None:
    job_id = next((e["job"]["job_id"] for e in events if "job" in e), None)
    if job_id:
        testbed.cetctl(SUBMITTER, "cancel", job_id).wait(timeout=60)


def _summarise(outcome: JobOutcome, testbed: Testbed, events: list[dict[str, Any]], readings: list[Reading],
               settings: JobSettings) -> None:
    steps = [e for e in events if e.get("event") == "step"]
    outcome.step_seconds = [float(e["seconds"]) for e in steps]
    outcome.losses = [float(e["loss"]) for e in steps]
    final = events[-1].get("job") if events and events[-1].get("event") == "finished" else None
    if final is None:
        return
    plan = final.get("plan") or {}
    outcome.product_seconds_per_sample = final.get("seconds_per_sample") or None
    outcome.product_joules_per_sample = final.get("joules_per_sample") or None
    outcome.energy_source = final.get("energy_source", "")
    outcome.predicted_seconds_per_sample = plan.get("predicted_seconds_per_sample") or None
    outcome.predicted_joules_per_sample = plan.get("predicted_joules_per_sample") or None
    outcome.estimated_memory_bytes = dict(plan.get("estimated_memory_bytes") or {})
    outcome.speed_sources = dict(plan.get("speed_sources") or {})
    fractions = testbed.device_set.cpu_fractions
    for worker in plan.get("workers", []):
        host = testbed.host_of_device.get(worker["device_id"], -1)
        outcome.workers.append({
            "host": host, "cpu_fraction": fractions[host] if host >= 0 else None,
            "stage": worker.get("stage", 0), "blocks": [worker.get("start_block", 0), worker.get("end_block", 0)],
            "tp_index": worker.get("tp_index", 0), "dp_index": worker.get("dp_index", 0),
        })
    if len(steps) < 2 or len(readings) < len(steps):
        return
    window = steps[1:]
    samples = sum(int(e["samples"]) for e in window)
    outcome.seconds_per_sample = sum(float(e["seconds"]) for e in window) / samples
    first, last = readings[0], readings[len(steps) - 1]
    workers = {w["host"] for w in outcome.workers}
    outcome.cpu_seconds = [b - a for a, b in zip(first.cpu_seconds, last.cpu_seconds, strict=True)]
    outcome.busy_seconds = [round(cpu / len(window) / fractions[host], 4)
                            for host, cpu in enumerate(outcome.cpu_seconds)]
    outcome.bytes_sent = [b - a for a, b in zip(first.bytes_sent, last.bytes_sent, strict=True)]
    received = [b - a for a, b in zip(first.bytes_received, last.bytes_received, strict=True)]
    wall = timedelta(seconds=last.at - first.at)
    # Idle power for the devices of the plan; the submitter's driver work (CPU, bytes) counts even when the
    # plan leaves that device out, its idle power then does not (it would be on with or without the job).
    usages = [DeviceUsage(device_id=str(host), wall=wall if host in workers else timedelta(0),
                          cpu_time=timedelta(seconds=outcome.cpu_seconds[host]),
                          bytes_sent=outcome.bytes_sent[host], bytes_received=received[host])
              for host in sorted(workers | {SUBMITTER})]
    cpu_only = EnergyModel(profiles={}, default=ENERGY_PROFILE)
    outcome.bench_joules_per_sample = cpu_only.job_joules(usages, samples=samples).joules_per_sample
    outcome.bench_energy_source = (f"model: {ENERGY_PROFILE.name} profile ({ENERGY_PROFILE.idle_watts:g} W idle, "
                                   f"{ENERGY_PROFILE.watts_per_core:g} W per busy core) over cgroup-metered "
                                   f"CPU-seconds and link bytes of {len(workers)} device(s) and the driver")
