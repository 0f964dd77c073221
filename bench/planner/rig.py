"""Three CPU-capped devices and a driver on one machine: start them once, profile them, run cetd jobs on them.

`Rig` starts one `bench.planner.device` process per simulated device, pinned (the full-core device alone
on core 0, the others together on core 1) and moved into a `tests.testbed.cgroups.CgroupLimits` cgroup
with the device's CPU quota before it runs any request; plus an unpinned, uncapped driver process (the
submitting device). Every process presents its own device certificate of a household CA made for the
run (`bench.pipeline.contenders.make_devices`). `Rig.profile` asks every device, at once, for the
daemon profiler's block time; `Rig.run` trains one `JobPlan` and returns what the driver and each worker
measured, with each cgroup's throttling over the run.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.pipeline.contenders import Device, make_devices
from bench.pipeline.processes import Child, Children
from cetd.runtime.spec import JobPlan, JobSpec, to_json
from tests.testbed.cgroups import CgroupLimits

__all__ = ["DeviceSetup", "JobRun", "Rig", "StageRun"]

_TIMEOUT = 600.0
"""Longest wait for one event (a whole run of a bad partition on a loaded machine included)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSetup:
    """One simulated device: its name, its share of a core and the core it is pinned to."""

    name: str
    cpu_fraction: float
    core: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StageRun:
    """What one worker measured over the timed steps of a run."""

    device: str
    stage: int
    blocks: tuple[int, int]
    cpu_seconds_per_step: float
    """CPU seconds of the whole worker process (compute and transport threads) per timed step."""
    main_cpu_seconds_per_step: float
    """Of which the compute (main) thread."""
    wait_share: float
    """Run-queue wait of the main thread over the timed window (other load and the quota's throttling)."""
    throttled_seconds_per_step: float
    """Time the device's cgroup was stopped by its quota, per step of the whole run (warm-up included)."""

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(slots=True, kw_only=True)
class JobRun:
    """One measured partition."""

    step_seconds: list[float]
    """Every step's wall seconds at the driver, warm-up first."""
    losses: list[float]
    warmup: int
    stages: list[StageRun] = field(default_factory=list)

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds[self.warmup :])

    def to_dict(self) -> dict[str, Any]:
        return {"step_seconds": self.step_seconds, "losses": self.losses, "warmup": self.warmup,
                "median_step": self.median_step, "stages": [s.to_dict() for s in self.stages]}


class Rig:
    """The driver and the devices' processes and cgroups; a context manager."""

    def __init__(self, setups: list[DeviceSetup], directory: Path, logs: Path) -> None:
        self.setups = setups
        self._directory = directory
        self._children = Children(logs)
        self._limits = [CgroupLimits(cpu_fraction=s.cpu_fraction) for s in setups]
        self.identities: list[Device] = []
        self._driver: Child | None = None
        self._devices: list[Child] = []

    @property
    def device_ids(self) -> dict[str, str]:
        """Device name → cetd device ID."""
        return {s.name: d.device_id for s, d in zip(self.setups, self.identities[1:], strict=True)}

    def __enter__(self) -> Rig:
        try:
            self.identities = make_devices(self._directory, len(self.setups) + 1)  # [0]: the driver
            for limits in self._limits:
                limits.__enter__()
            self._driver = self._children.start("bench.planner.device", "driver")
            self._driver.send(core=None, threads=1)
            for setup, limits in zip(self.setups, self._limits, strict=True):
                child = self._children.start("bench.planner.device", f"device-{setup.name}")
                limits.add(child.process.pid)  # before the launch message: nothing below runs unlimited
                child.send(core=setup.core, threads=1)
                self._devices.append(child)
            for child in [self._driver, *self._devices]:
                child.expect("started", _TIMEOUT)
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            self._children.__exit__(exc_type, exc, traceback)
        finally:
            for limits in self._limits:
                limits.close()

    def profile(self, spec: JobSpec, parts_on: str) -> dict[str, dict[str, Any]]:
        """Every device's profile, measured at once (as daemons do when they start); device ``parts_on``
        also times the workload's parts."""
        for setup, child in zip(self.setups, self._devices, strict=True):
            child.send(op="profile", parts=setup.name == parts_on, spec=json.loads(to_json(spec)))
        return {setup.name: child.expect("profiled", _TIMEOUT)
                for setup, child in zip(self.setups, self._devices, strict=True)}

    def run(self, spec: JobSpec, plan: JobPlan, warmup: int) -> JobRun:
        """Train ``plan`` (its workers name the rig's device IDs) for ``spec.steps`` steps."""
        assert self._driver is not None
        by_id = {d.device_id: index for index, d in enumerate(self.identities)}
        members = [d.device_id for d in self.identities]
        common = {"spec": json.loads(to_json(spec)), "plan": json.loads(to_json(plan)), "members": members,
                  "warmup": warmup}
        workers = sorted(plan.workers, key=lambda w: w.rank)
        processes = [self._driver, *(self._devices[by_id[w.device_id] - 1] for w in workers)]
        before = [limits.cpu_throttling().throttled_seconds for limits in self._limits]
        self._driver.send(op="driver", rank=0, tls=self.identities[0].files, **common)
        for worker, process in zip(workers, processes[1:], strict=True):
            process.send(op="worker", rank=worker.rank, tls=self.identities[by_id[worker.device_id]].files, **common)
        description = self._driver.expect("described", _TIMEOUT)["description"]
        addresses = [process.expect("ready", _TIMEOUT)["address"] for process in processes]
        order = [self.identities[0], *(self.identities[by_id[w.device_id]] for w in workers)]
        peers = {str(rank): [address, order[rank].tls_name] for rank, address in enumerate(addresses)}
        self._driver.send(peers=peers)
        for process in processes[1:]:
            process.send(peers=peers, description=description)
        done = self._driver.expect("done", _TIMEOUT)
        reports = [process.expect("done", _TIMEOUT)["stats"] for process in processes[1:]]
        after = [limits.cpu_throttling().throttled_seconds for limits in self._limits]
        run = JobRun(step_seconds=done["seconds"], losses=done["losses"], warmup=warmup)
        timed = spec.steps - warmup
        for worker, stats in zip(workers, reports, strict=True):
            index = by_id[worker.device_id] - 1
            main = stats["main_thread"]
            run.stages.append(StageRun(
                device=self.setups[index].name, stage=worker.stage, blocks=(worker.start_block, worker.end_block),
                cpu_seconds_per_step=stats["process_cpu_s"] / timed,
                main_cpu_seconds_per_step=stats["thread_cpu_s"].get(main, 0.0) / timed,
                wait_share=stats["thread_wait_s"].get(main, 0.0) / stats["window_s"],
                throttled_seconds_per_step=(after[index] - before[index]) / spec.steps,
            ))
        return run
