"""Benchmark cetd's 2-stage pipeline against one device and against torch.distributed.pipelining.

    python -m bench.pipeline.run [--quick] [--micro-batches 4,16] [--warmup 1] [--steps 4]
                                 [--schedule 1f1b|gpipe] [--rounds 1] [--contenders single,cetd,torch]
                                 [--logs DIR] [--check]

Same model (GPT-2, 8 blocks × 384, see `bench.pipeline.workload`), same data and micro-batches
(8 × 32 tokens each, M per step), same schedule and AdamW settings for all three contenders:

(a) ``single``: one process, one torch thread, pinned to core 0, cetd's reference trainer;
(b) ``cetd``: a driver process (unpinned) and two stage workers (one thread, pinned to cores 0 and 1)
    over `GrpcPeerChannel` with mutual TLS and certificates of a household CA made for the run;
(c) ``torch``: torch.distributed.pipelining over gloo, two processes of one thread, pinned alike.

First the single-device process measures each part's forward + backward (`bench.pipeline.split`);
the stage boundaries minimising the slowest stage are used by (b) and (c) alike. Each contender runs
``warmup`` untimed steps then ``steps`` timed ones; samples/s = global batch / median timed step.
Rounds (``--rounds``) repeat every contender with the order rotated, and the table shows medians, so
load from elsewhere on the machine hits all contenders alike. For cetd, where its processes' threads
waited on the channel is reported too. Results and raw samples go to bench/results/pipeline.json;
``--check`` exits 1 when cetd misses a floor at the largest M (≥ 1.6× single, ≥ 0.9× torch).

On a shared machine other load stretches wall time (the run-queue wait column says by how much), so
two estimates that hold without it are shown beside the raw numbers: "adjusted" removes the share of
the timed wall time the compute threads waited for their core, and the CPU table's "CPU-model" takes
each process's CPU seconds per step (on its pinned core, transport threads included) through the
pipeline formula. About 2.5 minutes on two idle cores; ``--quick`` (M=4, 1 + 2 steps) about 45 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from rich.console import Console

from bench.pipeline.contenders import RUNNERS, Bench, make_devices, measure_costs
from bench.pipeline.report import CONTENDERS, Run, Setting, print_tables, summarize
from bench.pipeline.workload import Workload, write_inputs

RESULTS = Path(__file__).resolve().parents[1] / "results" / "pipeline.json"
SINGLE_FLOOR = 1.6
TORCH_FLOOR = 0.9
_QUIET_WAIT_SHARE = 0.05
"""Above this run-queue wait share the machine was busy with other work during a run."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="M=4 only, 1 warm-up and 2 timed steps")
    parser.add_argument("--micro-batches", default="4,16", help="comma-separated M values (default 4,16)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run (default 1)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of "
                        f"{', '.join(CONTENDERS)} (ratios need all three)")
    parser.add_argument("--vocab", type=int, default=Workload().vocab)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this folder (default: discarded)")
    parser.add_argument("--check", action="store_true", help="exit 1 when cetd misses a floor at the largest M")
    args = parser.parse_args(argv)
    counts = [int(m) for m in args.micro_batches.split(",")]
    contenders = [c for c in args.contenders.split(",") if c]
    if not set(contenders) <= set(CONTENDERS):
        parser.error(f"--contenders takes {', '.join(CONTENDERS)}")
    warmup, steps = args.warmup, args.steps
    if args.quick:
        counts, warmup, steps = [4], 1, 2
    if len(os.sched_getaffinity(0)) < 2:
        print("the benchmark needs two cores (workers are pinned to cores 0 and 1)", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 132)
    workload = Workload(vocab=args.vocab)
    started = time.perf_counter()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="cetd-bench-pipeline-") as scratch:
        directory = Path(scratch)
        logs = args.logs or directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        folder, data = write_inputs(workload, directory)
        bench = Bench(workload=workload, folder=folder, data=data, logs=logs,
                      devices=make_devices(directory, 3), warmup=warmup, steps=steps, schedule=args.schedule)
        if "single" not in contenders:
            measure_costs(bench, counts[0])
        for round_number in range(args.rounds):
            for m in counts:
                order = [c for c in CONTENDERS[round_number % 3 :] + CONTENDERS[: round_number % 3] if c in contenders]
                if bench.costs is None:  # the single-device run measures the stage costs
                    order.remove("single")
                    order.insert(0, "single")
                for contender in order:
                    console.log(f"round {round_number + 1}/{args.rounds}, M={m}: {contender}")
                    run = RUNNERS[contender](bench, m, round_number)
                    console.log(f"  {run.samples_per_second:.1f} samples/s, steps "
                                f"{', '.join(f'{s:.2f}' for s in run.step_seconds)} s")
                    runs.append(run)
        summary = summarize(runs, counts)
        assert bench.costs is not None
        setting = Setting(workload=workload, schedule=args.schedule, warmup=warmup, steps=steps, costs=bench.costs,
                          boundaries={m: bench.boundaries(m) for m in counts})
        print_tables(console, setting, runs, summary, counts)
    elapsed = time.perf_counter() - started
    largest = summary[str(max(counts))]
    floors = {
        "cetd_over_single": largest["cetd_over_single"] >= SINGLE_FLOOR,
        "cetd_over_torch": largest["cetd_over_torch"] >= TORCH_FLOOR,
    }
    adjusted_floors = {
        "cetd_over_single": largest["adjusted_cetd_over_single"] >= SINGLE_FLOOR,
        "cetd_over_torch": largest["adjusted_cetd_over_torch"] >= TORCH_FLOOR,
    }
    worst_wait = max((w for w in largest["wait_share"].values() if w == w), default=0.0)  # w == w: not NaN
    noisy = worst_wait > _QUIET_WAIT_SHARE
    if noisy:
        console.print(f"[bold yellow]other load made the compute threads wait up to {100 * worst_wait:.0f}% of the "
                      "time: the raw numbers are not comparable; read the adjusted ones, or rerun on a quiet machine[/]")
    for label, prefix, met in (("raw", "", floors), ("adjusted", "adjusted_", adjusted_floors)):
        console.print(
            f"M={max(counts)} floors ({label}): cetd/single {largest[prefix + 'cetd_over_single']:.2f} "
            f"(≥ {SINGLE_FLOOR}: {'ok' if met['cetd_over_single'] else 'MISSED'}), "
            f"cetd/torch {largest[prefix + 'cetd_over_torch']:.2f} "
            f"(≥ {TORCH_FLOOR}: {'ok' if met['cetd_over_torch'] else 'MISSED'})"
        )
    console.print(f"whole benchmark {elapsed:.0f} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
        "workload": workload.to_dict(),
        "schedule": args.schedule,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "rounds": args.rounds,
        "costs": bench.costs.to_dict() if bench.costs else None,
        "boundaries": {str(m): list(bench.boundaries(m)) for m in counts},
        "summary": summary,
        "floors_met": floors,
        "adjusted_floors_met": adjusted_floors,
        "machine_was_busy": noisy,
        "seconds": elapsed,
        "runs": [run.to_dict() for run in runs],
    }, indent=2) + "\n")
    console.print(f"wrote {args.output}")
    return 1 if args.check and not all(floors.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
