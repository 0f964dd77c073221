"""Does cetd's planner pick a good pipeline partition on unequal devices? Measured against every alternative.

    python -m bench.planner.run [--quick] [--layers 6] [--micro-batches 8] [--warmup 1] [--steps 3]
                                [--rounds 3] [--fractions 1,0.5,0.25] [--all-orders] [--output PATH]
                                [--logs DIR]

Three simulated devices A, B, C — cetd worker processes capped by cgroup v1 CPU quotas at 100%, 50% and
25% of a core (A pinned alone to core 0, B and C to core 1) — and a driver process train a 3-stage 1F1B
pipeline of a GPT-2 (`bench.pipeline.workload`, 6 blocks × 384, vocabulary 8192, micro-batch 8 × 32,
M = 8) with cetd's runtime (`Driver` and `run_worker` over `GrpcPeerChannel` with mutual TLS;
`bench.planner.device`, `bench.planner.rig`). The devices first profile themselves as the daemon does
(`bench.planner.analysis.make_offers`); then every partition is measured (a warm-up step, then timed
steps; samples/s = global batch / median timed step):

(a) the planner's partition and device order: `plan_with_prediction` (pipeline, 3 devices) on the
    `DeviceOffer`s whose ``block_seconds`` come from that profile — the planner's real input;
(b) the even split (`even_pipeline_plan`) over the same device order;
(c) every contiguous partition of the blocks over the planner's device order, and over each of the 5
    other orders the 2 partitions (``--screen``) that the cost model with measured head and embedding
    costs ranks first (``--all-orders``: every partition over every order, about 3× longer); the best
    measured one is the reference.

Then the planners' picks, the even and the best partitions run ``--rounds`` − 1 more times (default 2),
interleaved, and their numbers pool all their runs; every other partition runs once.
Floors: planner ≥ 1.3× even, and planner ≥ 0.9× the best. Each row also shows the cost model's
predicted step against the measured one.

On a shared machine other processes take CPU from the devices (most from the uncapped A), which
flattens the very differences the planner must exploit. So besides raw wall time the benchmark
reports the load-free view: the planner fed the profile's CPU seconds over the quota, and each run's
step time rebuilt from its stages' measured CPU seconds (`cpu_model_step`). Both verdicts are printed.
It also measures the model's parts (head, embedding, blocks) and re-plans with the cost model's head
and embedding constants calibrated on them, to tell a cost-model error from noise.
Needs root and cgroup v1 (cpu); otherwise it says why and exits 0 without measuring. About 4 minutes
on two loaded cores; ``--quick`` (M=4, 1 + 2 steps) about 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rich.console import Console

from bench.pipeline.workload import Workload, write_inputs
from bench.planner.analysis import (
    LOOPBACK,
    Candidate,
    Offers,
    calibrated,
    chain_of,
    head_efficiency_for,
    make_offers,
    measured_loads,
    partitions,
    ranges_of,
)
from bench.planner.report import VIEWS, Row, print_tables, verdicts
from bench.planner.rig import DeviceSetup, Rig
from cetd.cluster import shape_costs
from cetd.cluster.cost_model import DeviceOffer, Link, predict
from cetd.cluster.planner import PlannedJob, even_pipeline_plan, plan_with_prediction
from cetd.runtime.spec import JobSpec, ModelDescription
from tests.testbed.cgroups import cgroup_v1_unavailable_reason

RESULTS = Path(__file__).resolve().parents[1] / "results" / "planner.json"
NAMES = ("A", "B", "C")


def _plan(spec: JobSpec, description: ModelDescription, offers: Mapping[str, DeviceOffer]) -> PlannedJob:
    return plan_with_prediction(spec, description, list(offers.values()), links=_links(offers))


def _links(offers: Mapping[str, DeviceOffer]) -> dict[tuple[str, str], Link]:
    ids = [o.device_id for o in offers.values()]
    return {(a, b): LOOPBACK for a, b in itertools.combinations(ids, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="M=4, 1 warm-up and 2 timed steps")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--fractions", default="1,0.5,0.25", help="CPU quota of devices A, B, C (cores)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of the planner's, the even and the best partitions (others run once)")
    parser.add_argument("--screen", type=int, default=2,
                        help="over each other device order, measure the calibrated model's best N partitions")
    parser.add_argument("--all-orders", action="store_true", help="every partition over every device order")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--logs", type=Path, help="keep the processes' logs here (default: discarded)")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    reason = cgroup_v1_unavailable_reason()
    if reason is not None:
        console.print(f"[yellow]skipped: the planner benchmark caps each device with a cgroup CPU quota and {reason}[/]")
        return 0
    if len(os.sched_getaffinity(0)) < 2:
        console.print("[yellow]skipped: the benchmark needs two cores (A on core 0, B and C on core 1)[/]")
        return 0
    micro_batches, warmup, steps = args.micro_batches, args.warmup, args.steps
    if args.quick:
        micro_batches, warmup, steps = 4, 1, 2
    fractions = dict(zip(NAMES, (float(f) for f in args.fractions.split(",")), strict=True))
    setups = [DeviceSetup(name=n, cpu_fraction=fractions[n], core=0 if i == 0 else 1) for i, n in enumerate(NAMES)]
    workload = Workload(layers=args.layers)
    started, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cetd-bench-planner-") as scratch:
        directory = Path(scratch)
        logs = args.logs or directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        folder, data = write_inputs(workload, directory)
        base = workload.job_spec(folder, data, micro_batches=micro_batches, steps=warmup + steps, schedule="1f1b")
        spec = dataclasses.replace(base, devices=3, checkpoint_every=0)
        from cetd.runtime.driver import Driver

        description = Driver(spec).describe()
        with Rig(setups, directory, logs) as rig:
            console.log("profiling the devices under their quotas (the daemon's block profile, concurrently)")
            profiles = rig.profile(spec, parts_on="A")
            names = {device_id: name for name, device_id in rig.device_ids.items()}
            offers = make_offers(profiles, setups, rig.device_ids, description, spec.seq_len)
            rows, planned, model_best = _candidates(spec, description, offers, profiles["A"]["parts"], names,
                                                    all_orders=args.all_orders, screen=args.screen)
            for name, planned_job in planned.items():
                console.log(f"{name}: {_named(planned_job.plan.reason, names)}")
            queue = sorted(rows, key=lambda r: (not r.tags, r.source != "exhaustive"))
            for index, row in enumerate(queue):
                console.log(f"run {index + 1}/{len(queue)}: {row.candidate.key} ({', '.join(row.tags) or row.source})")
                row.runs.append(rig.run(spec, row.candidate.plan(spec, offers.raw), warmup))
                console.log(f"  steps {', '.join(f'{s:.2f}' for s in row.runs[-1].step_seconds)} s")
            summary = verdicts(rows, fractions, micro_batches)
            again = {r.candidate.key: r for r in rows if r.tags}
            for label in VIEWS:
                again.setdefault(summary[label]["best"], next(r for r in rows if r.candidate.key == summary[label]["best"]))
            for round_number in range(2, args.rounds + 1):
                for row in again.values():
                    console.log(f"round {round_number}: {row.candidate.key} ({', '.join(row.tags) or 'best'})")
                    row.runs.append(rig.run(spec, row.candidate.plan(spec, offers.raw), warmup))
                    console.log(f"  steps {', '.join(f'{s:.2f}' for s in row.runs[-1].step_seconds)} s")
        summary = verdicts(rows, fractions, micro_batches)
        for label in ("wall", "cpu_model"):
            next(r for r in rows if r.candidate.key == summary[label]["best"]).tags.append(f"best {label}")
        overhead = runtime_overhead(rows, profiles["A"]["parts"], fractions, micro_batches)
        print_tables(console, rows, fractions, micro_batches, spec.global_batch, summary)
    elapsed = time.perf_counter() - started
    head, embedding = measured_loads(profiles["A"]["parts"])
    model = shape_costs.model_costs(spec, description)
    console.print(f"head + loss = {head:.2f} blocks measured, {model.head_blocks:.2f} in the cost model; "
                  f"embedding = {embedding:.2f} measured, {model.embedding_blocks:.2f} modelled")
    console.print("best of all " + str(len(list(itertools.permutations(NAMES))) * len(partitions(args.layers, 3)))
                  + " partitions over every order, as each prediction ranks them: "
                  + "; ".join(f"{label} {key}" for label, key in model_best.items()))
    console.print(f"cetd's stages spent {overhead:.2f}× the CPU of the isolated parts (runtime and transport "
                  "threads; the cost model assumes 1×)")
    console.print(f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; "
                  f"whole benchmark {elapsed:.0f} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "workload": workload.to_dict(), "micro_batches": micro_batches, "schedule": "1f1b",
        "warmup_steps": warmup, "timed_steps": steps, "all_orders": args.all_orders,
        "devices": [dataclasses.asdict(s) for s in setups],
        "profiles": profiles,
        "offers_block_seconds": {"raw": {n: o.block_seconds for n, o in offers.raw.items()},
                                 "load_free": {n: o.block_seconds for n, o in offers.load_free.items()}},
        "cost_model": {"head_blocks": model.head_blocks, "embedding_blocks": model.embedding_blocks,
                       "measured_head_blocks": head, "measured_embedding_blocks": embedding,
                       "head_efficiency": shape_costs.HEAD_EFFICIENCY,
                       "head_efficiency_fitting_measurement": head_efficiency_for(spec, description, head),
                       "runtime_cpu_over_isolated_parts": overhead},
        "plans": {name: {"partition": Candidate(chain=chain_of(p.plan, names), ranges=ranges_of(p.plan)).key,
                         "reason": _named(p.plan.reason, names), "predicted_step_seconds": p.prediction.step_seconds}
                  for name, p in planned.items()},
        "model_best": model_best,
        "summary": summary,
        "rows": [r.to_dict(fractions, micro_batches, spec.global_batch) for r in rows],
        "seconds": elapsed,
    }, indent=2) + "\n")
    console.print(f"wrote {args.output}")
    return 0


def _named(text: str, names: Mapping[str, str]) -> str:
    """``text`` with every device ID replaced by the device's name."""
    for device_id, name in names.items():
        text = text.replace(device_id, name)
    return text


def runtime_overhead(rows: Sequence[Row], parts: Mapping[str, Any], fractions: Mapping[str, float],
                     micro_batches: int) -> float:
    """CPU seconds the stages used per step, over what the isolated parts cost (`measure_costs`), all runs."""
    used = isolated = 0.0
    for row in rows:
        for run in row.runs:
            used += sum(s.cpu_seconds_per_step for s in run.stages)
            isolated += micro_batches * (sum(parts["blocks"]) + parts["head"] + parts["embedding"])
    return used / isolated


def _candidates(spec: JobSpec, description: ModelDescription, offers: Offers, parts: Mapping[str, Any],
                names: dict[str, str], *, all_orders: bool, screen: int) -> tuple[list[Row], dict[str, PlannedJob],
                                                                                dict[str, str]]:
    """The partitions to measure, tagged, with their three predictions; the three planners' picks; and,
    per prediction, the partition it ranks first among every partition over every device order.

    Measured: every partition over the planner's device order (over every order with ``all_orders``),
    the planners' picks, and over each other order the ``screen`` partitions the calibrated model ranks
    first (a net for a better order; the calibrated model's ranking is checked by the measurements).
    """
    head, embedding = measured_loads(parts)
    efficiency = head_efficiency_for(spec, description, head)
    planned = {"planner": _plan(spec, description, offers.raw),
               "planner (load-free)": _plan(spec, description, offers.load_free)}
    with calibrated(head_efficiency=efficiency, embedding_blocks=embedding):
        planned["planner (calibrated)"] = _plan(spec, description, offers.load_free)
    chain = chain_of(planned["planner"].plan, names)
    even = even_pipeline_plan(spec, description, [offers.raw[n] for n in chain])
    picks = {tag: Candidate(chain=chain_of(p.plan, names), ranges=ranges_of(p.plan)) for tag, p in planned.items()}
    picks["even"] = Candidate(chain=chain, ranges=ranges_of(even))
    rows: dict[str, Row] = {}
    for order in itertools.permutations(chain):
        for ranges in partitions(description.num_blocks, len(chain)):
            candidate = Candidate(chain=order, ranges=ranges)
            source = "exhaustive" if all_orders or order == chain else ""
            rows[candidate.key] = Row(candidate=candidate, source=source,
                                      predicted=_predictions(spec, description, offers, candidate, efficiency, embedding),
                                      tags=[tag for tag, pick in picks.items() if pick.key == candidate.key])
    for order in itertools.permutations(chain):
        ranked = sorted((r for r in rows.values() if r.candidate.chain == order and not r.source),
                        key=lambda r: r.predicted["calibrated"])
        for row in ranked[:screen]:
            row.source = f"model's top {screen} of its order"
    for row in rows.values():
        if row.tags and not row.source:
            row.source = "pick"
    model_best = {label: min(rows.values(), key=lambda r: r.predicted[label]).candidate.key
                  for label in ("raw", "load_free", "calibrated")}
    return [r for r in rows.values() if r.source], planned, model_best


def _predictions(spec: JobSpec, description: ModelDescription, offers: Offers, candidate: Candidate,
                 efficiency: float, embedding: float) -> dict[str, float]:
    predicted = {}
    for label, view in (("raw", offers.raw), ("load_free", offers.load_free)):
        plan = candidate.plan(spec, view)
        predicted[label] = predict(spec, description, plan, list(view.values()), links=_links(view)).step_seconds
    with calibrated(head_efficiency=efficiency, embedding_blocks=embedding):
        plan = candidate.plan(spec, offers.load_free)
        predicted["calibrated"] = predict(spec, description, plan, list(offers.load_free.values()),
                                          links=_links(offers.load_free)).step_seconds
    return predicted


if __name__ == "__main__":
    raise SystemExit(main())
