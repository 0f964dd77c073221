"""Contender (a): one process, one torch thread, one core, running cetd's reference trainer.

``python -m bench.pipeline.single`` reads its launch message (the job spec, ``core``, ``profile``),
optionally measures the model's stage costs first (`bench.pipeline.split.measure_costs`, on the same
pinned core), then trains the job's steps with `cetd.runtime.reference.train_reference` on the
micro-batches the driver would feed, and reports every step's seconds and loss.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch

from bench.pipeline.child import emit, mark, start, step_report
from bench.pipeline.schedstat import ThreadTimes
from bench.pipeline.split import measure_costs
from bench.pipeline.workload import load_workload
from cetd.runtime.reference import train_reference
from cetd.runtime.spec import JobSpec, from_json
from cetd.runtime.worker import adamw_settings


def _timed(
    steps: list[list[dict[str, torch.Tensor]]], marks: list[tuple[float, ThreadTimes, ThreadTimes]]
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Yield the steps, noting the time (and CPU) as each starts and when the last one has ended."""
    for micro_batches in steps:
        marks.append(mark())
        yield micro_batches
    marks.append(mark())


def main() -> None:
    launch = start("single")
    spec = from_json(JobSpec, json.dumps(launch["spec"]))
    loaded = load_workload(spec)
    steps = [loaded.step_batches(spec, step) for step in range(spec.steps)]
    if launch.get("profile"):
        costs = measure_costs(loaded.model, loaded.adapter, steps[0][0])
        emit("costs", costs=costs.to_dict())
        if launch.get("profile_only"):
            return
        loaded = load_workload(spec)  # profiling left gradients behind: start from the saved weights
    marks: list[tuple[float, ThreadTimes, ThreadTimes]] = []
    run = train_reference(loaded.model, _timed(steps, marks), settings=adamw_settings(spec), seed=spec.seed)
    emit("done", losses=run.losses, **step_report(marks))


if __name__ == "__main__":
    main()
