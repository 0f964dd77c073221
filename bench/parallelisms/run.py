"""Reproduce the paper's parallelism study (its Figures 5 and 6) on four simulated edge devices.

    sudo .venv/bin/python -m bench.parallelisms.run [--quick] [--steps N] [--min-window S] [--runs N]
                                                    [--sets homogeneous,heterogeneous] [--models distilbert,...]
                                                    [--output-dir bench/results]

The paper trains DistilBERT, GPT2-S, OPT-350M and GPT2-L on four Jetson boards over 1000 Mbps Wi-Fi with
single-device, data, tensor and pipeline parallelism and reports seconds and joules per sample. Here:

- models: the four, scaled down by one common factor (`bench.parallelisms.shapes`: width ÷ 8,
  depth ÷ 1.5, heads kept), saved as local folders and trained through ``cetctl train --model FOLDER``;
- devices: four network-namespace hosts on 1000 Mbit token-bucket links (`bench.parallelisms.testbed`),
  each daemon — with its driver and worker processes — in a cgroup with a CPU quota: a homogeneous set
  (45% of a core each) and a heterogeneous one (80/40/40/20%, the paper's mixed boards' 4:2:2:1);
- memory: the paper's 4 GB boards hold OPT-350M but not GPT2-L; each device's
  ``device.memory_limit_bytes`` is set between what the planner says the scaled OPT-350M and GPT2-L
  need on one device (and the cgroup memory limit to that plus `DAEMON_ALLOWANCE_BYTES`), so the largest
  model fits no single device, as in the paper;
- jobs: global batch 32, sequence 32 (the paper's 128 ÷ 4, and its 32), 4 micro-batches, 5 steps or
  more: as many as the plan's forecast says make the steady state last 10 s (``--quick``: batch 16,
  sequence 16, 3 steps, homogeneous set only); step 1 (start-up) is left out of the steady-state
  figures (`bench.parallelisms.jobs`);
- runs: each set is gone through twice (``--runs``; 1 with ``--quick``): a second pass submits every job
  that ran once more, tens of minutes after its first run, with a fresh plan from the same household. The
  forecast is held to the runs' mean (`JobOutcome.pooled_error`): in the study of 2026-11-27 the same
  job's measured s/sample moved by 10–48% between two runs minutes apart (steps within one run varied
  by 3–15%), so one run's figure says as much about the machine's spell as about the forecast. Every
  run's own error is kept, and the summary gives first runs alone beside the pooled figure. The bars
  and the joules are the first run's.

Prints a table per device set, writes ``parallelisms.json`` and ``parallelisms.png`` to the output
folder. Needs root (namespaces, cgroups); without it, it says so and exits 0 without measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rich.console import Console

from bench.parallelisms.jobs import ENERGY_PROFILE, MISS, JobOutcome, JobSettings, run_job
from bench.parallelisms.report import PARALLELISMS, plot, prediction_summary, print_tables, write_json
from bench.parallelisms.shapes import DEPTH_DIVISOR, PAPER_MODELS, WIDTH_DIVISOR, ScaledModel, build_scaled_models
from bench.parallelisms.testbed import (
    DAEMON_ALLOWANCE_BYTES,
    HETEROGENEOUS,
    HOMOGENEOUS,
    LINK_MBIT,
    DeviceSet,
    testbed,
    unavailable_reason,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"
DEVICE_SETS = {s.name: s for s in (HOMOGENEOUS, HETEROGENEOUS)}
FULL = JobSettings(steps=5, global_batch=32, micro_batches=4, seq_len=32, timeout=timedelta(minutes=8),
                   min_window=timedelta(seconds=10))
"""The paper's sequence length, a quarter of its global batch (128): steps of ≈ 0.1–10 s on these devices,
each job run for at least 10 s of steady state (a spell of this shared machine lasts seconds). The first
job of a model also waits for every device to profile its shape: about 3 minutes on the heterogeneous
set, whose 20% device then runs 5 tensor-parallel steps of 7–10 s."""
QUICK = JobSettings(steps=3, global_batch=16, micro_batches=4, seq_len=16, timeout=timedelta(minutes=5))
"""A smoke run: steps shorter than the CFS period (100 ms) for the small models, so noisier figures. The
first job of a model (single) also waits for the four devices to profile its shape one after another:
2 minutes and more here, so a shorter limit timed out every single-device job."""


def write_data(root: Path, lines: int = 256) -> dict[str, Path]:
    """A causal-LM text file and a QNLI-like sentence-pair file (question, sentence, entailment label)."""
    root.mkdir(parents=True, exist_ok=True)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "small", "birds",
             "sing", "in", "old", "trees"]
    text, pairs = root / "text.jsonl", root / "pairs.jsonl"
    with text.open("w") as stream:
        for i in range(lines):
            stream.write(json.dumps({"text": " ".join(words[(i * j + j) % len(words)] for j in range(12))}) + "\n")
    with pairs.open("w") as stream:
        for i in range(lines):
            stream.write(json.dumps({"question": f"which bird sings in tree {i % 13}?",
                                     "sentence": f"bird {i % 7} sings in the tree {i % 11} at dawn",
                                     "label": i % 2}) + "\n")
    return {"causal_lm": text, "sequence_classification": pairs}


def memory_cap(models: list[ScaledModel], data: dict[str, Path], settings: JobSettings) -> tuple[int, dict[str, int]]:
    """Each device's memory, as the product's planner counts it (runtime, 4 copies of the weights, activations).

    Halfway between what OPT-350M and GPT2-L need on one device (the paper's 4 GB boards hold the first,
    not the second), raised if need be so that a quarter share of GPT2-L — a 4-way pipeline stage or
    tensor slice — still fits. ``models`` must hold all four paper models.

    Returns the cap and every model's single-device need.
    """
    import torch

    from cetd.cluster.planner import DeviceOffer, plan_job
    from cetd.runtime.driver import Driver
    from cetd.runtime.spec import JobSpec

    torch.set_num_threads(1)
    roomy = [DeviceOffer(device_id=f"d{i}", memory_bytes=1 << 40, cores=1) for i in range(4)]
    needs, shares = {}, {}
    for model in models:
        spec = JobSpec(model=str(model.folder), data=str(data[model.task]), steps=settings.steps,
                       global_batch=settings.global_batch, micro_batches=settings.micro_batches,
                       seq_len=settings.seq_len, parallelism="single")
        description = Driver(spec).describe()
        needs[model.name] = plan_job(spec, description, roomy).estimated_memory_bytes["d0"]
        shares[model.name] = max(
            max(plan_job(replace(spec, parallelism=p, devices=4), description, roomy).estimated_memory_bytes.values())
            for p in ("pipeline", "tensor"))
    cap = max((needs["opt-350m"] + needs["gpt2-large"]) // 2, shares["gpt2-large"])
    if not needs["opt-350m"] <= cap < needs["gpt2-large"]:
        raise RuntimeError(f"no memory cap holds OPT-350M ({needs['opt-350m']} B) and a quarter of GPT2-L "
                           f"({shares['gpt2-large']} B) but not all of GPT2-L ({needs['gpt2-large']} B)")
    return cap, needs


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.parallelisms.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="homogeneous set only, smaller and fewer steps (≈ 15 min: each model's first job waits for its profiling)")
    parser.add_argument("--steps", type=int, default=0, help="least steps per job (default 5, or 3 with --quick)")
    parser.add_argument("--min-window", type=float, default=None, metavar="SECONDS",
                        help="raise a job's steps until its steady state's forecast lasts this long (default 10, "
                             "0 with --quick)")
    parser.add_argument("--sets", default="", help=f"device sets, comma-separated: {', '.join(DEVICE_SETS)}")
    parser.add_argument("--models", default=",".join(PAPER_MODELS), help="models, comma-separated")
    parser.add_argument("--parallelisms", default=",".join(PARALLELISMS), help="parallelisms, comma-separated")
    parser.add_argument("--runs", type=int, default=0,
                        help="passes over each device set: later passes submit every job that ran again and the "
                             "forecast is held to the runs' mean (default 2, or 1 with --quick)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def _unwind_on_sigterm() -> None:
    """Make SIGTERM (``kill``, a CI time limit) unwind like Ctrl-C, so the testbed's daemons, namespaces and
    cgroups are removed on the way out instead of outliving the study."""
    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    _unwind_on_sigterm()
    console = Console(width=max(Console().width, 160))
    reason = unavailable_reason()
    if reason is not None:
        console.print(f"bench.parallelisms: skipped — this study {reason}. Run it as root on a machine with "
                      "iproute2 and cgroup v1 (cpu, cpuacct, memory).")
        return 0
    settings = QUICK if args.quick else FULL
    if args.steps:
        settings = replace(settings, steps=args.steps)
    if args.min_window is not None:
        settings = replace(settings, min_window=timedelta(seconds=max(args.min_window, 0.0)))
    if settings.steps < 2:
        console.print("bench.parallelisms: --steps must be at least 2 (step 1 is start-up and is left out)")
        return 2
    runs = args.runs or (1 if args.quick else 2)
    if runs < 1:
        console.print("bench.parallelisms: --runs must be at least 1")
        return 2
    set_names = args.sets.split(",") if args.sets else ["homogeneous"] if args.quick else list(DEVICE_SETS)
    names = tuple(args.models.split(","))
    parallelisms = tuple(args.parallelisms.split(","))
    for given, known, what in ((set_names, DEVICE_SETS, "device set"), (names, PAPER_MODELS, "model"),
                               (parallelisms, PARALLELISMS, "parallelism")):
        unknown = sorted(set(given) - set(known))
        if unknown:
            console.print(f"bench.parallelisms: unknown {what}(s) {', '.join(unknown)}; known: {', '.join(known)}")
            return 2
    sets = [DEVICE_SETS[name] for name in set_names]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cetd-bench-parallelisms-") as scratch:
        root = Path(scratch)
        every_model = build_scaled_models(root / "models")
        data = write_data(root / "data")
        cap, needs = memory_cap(every_model, data, settings)
        models = [m for m in every_model if m.name in names]
        _describe(console, models, needs, cap, settings, sets)
        outcomes: list[JobOutcome] = []
        for device_set in sets:
            outcomes.extend(_run_set(console, root / device_set.name, device_set, models, data, parallelisms,
                                     settings, cap, runs=runs))
    elapsed = time.monotonic() - started
    print_tables(outcomes, console)
    summaries = prediction_summary(outcomes)
    for key, what in (("all", f"over {runs} run(s) each"), ("first_run", "first runs alone")):
        summary = summaries[key]
        if summary["jobs"] and (key == "all" or runs > 1):
            console.print(f"planner's predicted s/sample vs measured, {what}: median {summary['median']:+.0%} "
                          f"(from {summary['min']:+.0%} to {summary['max']:+.0%}) over {summary['jobs']} jobs; "
                          f"within {MISS:.0%}: {summary['within']} of {summary['jobs']}")
    if summaries["spread"]["jobs"]:
        spread = summaries["spread"]
        console.print(f"the same job's measured s/sample spread between its runs by a median {spread['median']:.0%}, "
                      f"at most {spread['max']:.0%}")
    meta = _meta(models, needs, cap, settings, sets, elapsed, quick=args.quick, runs=runs)
    suffix = "-quick" if args.quick else ""
    json_path, png_path = args.output_dir / f"parallelisms{suffix}.json", args.output_dir / f"parallelisms{suffix}.png"
    write_json(json_path, meta, outcomes)
    plot(png_path, outcomes, title=(
        f"cetd, 4 namespace hosts on {LINK_MBIT} Mbit links; models scaled (width ÷{WIDTH_DIVISOR}, depth "
        f"÷{DEPTH_DIVISOR:g}); batch {settings.global_batch}, seq {settings.seq_len}, {settings.micro_batches} "
        f"micro-batches; steady state ≥ {settings.steps - 1} steps and ≥ {settings.min_window.total_seconds():g} s "
        f"forecast; J = bench model ({ENERGY_PROFILE.name} CPU)"))
    console.print(f"wrote {json_path} and {png_path} ({elapsed / 60:.1f} min)")
    return 0


def _describe(console: Console, models: list[ScaledModel], needs: dict[str, int], cap: int, settings: JobSettings,
              sets: list[DeviceSet]) -> None:
    for model in models:
        console.print(f"{model.name}: {model.blocks} blocks × {model.hidden} hidden, {model.heads} heads, "
                      f"{model.parameters / 1e6:.2f} M parameters ({model.full_parameters / model.parameters:.0f}× "
                      f"fewer than the paper's {model.full_parameters / 1e6:.0f} M); one device needs "
                      f"{needs[model.name] / 2**20:.0f} MiB (planner)")
    console.print(f"each device: {cap / 2**20:.0f} MiB for workers (device.memory_limit_bytes), cgroup limit "
                  f"{(cap + DAEMON_ALLOWANCE_BYTES) / 2**20:.0f} MiB; sets: "
                  + "; ".join(f"{s.name} {'/'.join(f'{f:.0%}' for f in s.cpu_fractions)} of a core" for s in sets)
                  + f"; {settings.steps} steps or more (a steady state of ≥ {settings.min_window.total_seconds():g} s forecast) of "
                  f"{settings.global_batch} × {settings.seq_len} tokens")


def _run_set(console: Console, root: Path, device_set: DeviceSet, models: list[ScaledModel],
             data: dict[str, Path], parallelisms: tuple[str, ...], settings: JobSettings,
             cap: int, *, runs: int) -> list[JobOutcome]:
    """Every model × parallelism on one device set; then ``runs - 1`` passes more over the jobs that ran, in
    the same order, each run's figures kept in its first run's `JobOutcome.repeats`."""
    outcomes = []
    with testbed(root, device_set, memory_limit_bytes=cap) as bed:
        console.print(f"[bold]{device_set.name}[/]: household of {len(bed.household.daemons)} up")
        for model in models:
            for parallelism in parallelisms:
                outcome = run_job(bed, model=model.name, folder=model.folder, data=data[model.task],
                                  parallelism=parallelism, settings=settings)
                outcomes.append(outcome)
                _print_job(console, outcome)
        for number in range(2, runs + 1):
            for outcome in [o for o in outcomes if o.status == "ok"]:
                model = next(m for m in models if m.name == outcome.model)
                again = run_job(bed, model=model.name, folder=model.folder, data=data[model.task],
                                parallelism=outcome.parallelism, settings=settings)
                outcome.repeats.append((again.seconds_per_sample, again.predicted_seconds_per_sample))
                _print_job(console, again, f"run {number} ")
    return outcomes


def _print_job(console: Console, outcome: JobOutcome, label: str = "") -> None:
    measured = (f"{outcome.seconds_per_sample:.4f} s/sample, {outcome.bench_joules_per_sample:.3f} J/sample"
                if outcome.seconds_per_sample and outcome.bench_joules_per_sample else outcome.reason)
    error = outcome.prediction_error
    console.print(f"  {label}{outcome.model:<11} {outcome.parallelism:<9} {outcome.status:<8} {measured}"
                  + ("" if error is None else f", forecast {error:+.0%}") + f" ({outcome.wall_seconds:.0f} s)")


def _meta(models: list[ScaledModel], needs: dict[str, int], cap: int, settings: JobSettings, sets: list[DeviceSet],
          elapsed: float, *, quick: bool, runs: int) -> dict[str, Any]:
    return {
        "benchmark": "parallelisms", "quick": quick, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "scaling": {"width_divisor": WIDTH_DIVISOR, "depth_divisor": DEPTH_DIVISOR, "heads": "kept",
                    "global_batch": f"{settings.global_batch} (paper 128)",
                    "seq_len": f"{settings.seq_len} (paper 32)"},
        "models": [{**asdict(m), "folder": m.folder.name, "single_device_need_bytes": needs[m.name]} for m in models],
        "devices": {"link_mbit": LINK_MBIT, "memory_limit_bytes": cap,
                    "cgroup_memory_bytes": cap + DAEMON_ALLOWANCE_BYTES,
                    "sets": {s.name: list(s.cpu_fractions) for s in sets}},
        "settings": {"steps": settings.steps, "global_batch": settings.global_batch,
                     "micro_batches": settings.micro_batches, "seq_len": settings.seq_len,
                     "min_window_seconds": settings.min_window.total_seconds(), "max_steps": settings.max_steps,
                     "steady_state": "steps 2..N", "runs": runs},
        "energy": {"bench": f"model: {ENERGY_PROFILE.name} profile over cgroup-metered CPU-seconds and link bytes",
                   "profile": asdict(ENERGY_PROFILE)},
        "elapsed_seconds": elapsed,
    }


if __name__ == "__main__":
    sys.exit(main())
