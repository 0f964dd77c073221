"""The benchmark's results: one contender's run, the summary over rounds, and the tables printed.

A `Run` keeps every step's wall seconds and, per compute process, CPU seconds per step and the share
of the timed wall time its main thread waited for its core (`bench.pipeline.schedstat`). `summarize`
takes medians over rounds; `print_tables` prints the comparison, the ratios against the floors, the
CPU table with its contention-free pipeline estimate, and where cetd's threads waited.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.pipeline.split import StageCosts, stage_seconds
from bench.pipeline.workload import Workload

__all__ = ["CONTENDERS", "Run", "Setting", "cpu_model_step", "print_tables", "summarize"]

CONTENDERS = ("single", "cetd", "torch")


@dataclass(slots=True, kw_only=True)
class Run:
    """One contender's run at one M."""

    contender: str
    micro_batches: int
    round: int
    step_seconds: list[float]
    losses: list[float]
    warmup: int
    global_batch: int
    wait_share: float
    """Run-queue wait of the compute processes' main threads over the timed steps, as a share of the
    timed wall time (averaged over the processes): how much other load on the machine slowed this run."""
    cpu_per_step: list[tuple[float, float]] = field(default_factory=list)
    """Per compute process (stage order): CPU seconds per timed step of its main thread and of its other
    threads; unlike wall time, hardly changed by other load."""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def timed(self) -> list[float]:
        return self.step_seconds[self.warmup :]

    @property
    def samples_per_second(self) -> float:
        """Global batch over the median timed step."""
        return self.global_batch / statistics.median(self.timed)

    @property
    def adjusted_samples_per_second(self) -> float:
        """An estimate without other load: timed samples over the timed wall time less the share the
        compute threads spent waiting for their core. Exact for one process; for a pipeline it assumes
        the waits hit both stages alike."""
        return self.global_batch * len(self.timed) / (sum(self.timed) * (1 - self.wait_share))

    def to_dict(self) -> dict[str, Any]:
        return {
            "contender": self.contender,
            "micro_batches": self.micro_batches,
            "round": self.round,
            "step_seconds": self.step_seconds,
            "warmup": self.warmup,
            "losses": self.losses,
            "samples_per_second": self.samples_per_second,
            "wait_share": self.wait_share,
            "adjusted_samples_per_second": self.adjusted_samples_per_second,
            "cpu_per_step": self.cpu_per_step,
            "stats": self.stats,
        }


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[Run], micro_batch_counts: Sequence[int]) -> dict[str, Any]:
    """Per M: median samples/s (raw and adjusted for other load) per contender, and the ratios."""
    summary: dict[str, Any] = {}
    for m in micro_batch_counts:
        mine = [r for r in runs if r.micro_batches == m]

        def median_of(attribute: str, contender: str, runs_at_m: list[Run] = mine) -> float:
            return _median([getattr(r, attribute) for r in runs_at_m if r.contender == contender])

        rate = {c: median_of("samples_per_second", c) for c in CONTENDERS}
        adjusted = {c: median_of("adjusted_samples_per_second", c) for c in CONTENDERS}
        summary[str(m)] = {
            "samples_per_second": rate,
            "adjusted_samples_per_second": adjusted,
            "wait_share": {c: median_of("wait_share", c) for c in CONTENDERS},
            "cetd_over_single": rate["cetd"] / rate["single"],
            "cetd_over_torch": rate["cetd"] / rate["torch"],
            "torch_over_single": rate["torch"] / rate["single"],
            "adjusted_cetd_over_single": adjusted["cetd"] / adjusted["single"],
            "adjusted_cetd_over_torch": adjusted["cetd"] / adjusted["torch"],
            "adjusted_torch_over_single": adjusted["torch"] / adjusted["single"],
            "bound_2m_over_m_plus_1": 2 * m / (m + 1),
            "step1_loss": {c: next((r.losses[0] for r in mine if r.contender == c), None) for c in CONTENDERS},
        }
    return summary


def cpu_model_step(run: Run) -> float:
    """Seconds per step a pipeline would take on idle cores, from its processes' CPU per step: the slowest
    stage's CPU plus one micro-batch of the other stage (fill and drain); one process: its CPU."""
    totals = sorted(main + other for main, other in run.cpu_per_step)
    return totals[-1] + sum(totals[:-1]) / run.micro_batches


def _seconds_breakdown(stats: dict[str, Any], steps: int) -> dict[str, float]:
    """Milliseconds per timed step of each kind of wait, and what is left (compute and Python)."""
    if not stats:
        return {}
    per_step = {f"recv {kind}": 1000 * s / steps for kind, s in stats["recv_wait_s"].items()}
    per_step.update({f"send {kind}": 1000 * s / steps for kind, s in stats["send_call_s"].items()})
    per_step.update({f"wait {kind}": 1000 * s / steps for kind, s in stats["handle_wait_s"].items()})
    waits = sum(per_step.values())
    per_step["window"] = 1000 * stats["window_s"] / steps
    per_step["rest (compute)"] = per_step["window"] - waits
    threads = stats["thread_cpu_s"]
    waits_by_thread = stats.get("thread_wait_s", {})
    main_thread = stats.get("main_thread", "")
    per_step["cpu main thread"] = 1000 * threads.get(main_thread, 0.0) / steps
    per_step["cpu other threads"] = 1000 * (sum(threads.values()) - threads.get(main_thread, 0.0)) / steps
    per_step["run-queue wait main thread"] = 1000 * waits_by_thread.get(main_thread, 0.0) / steps
    per_step["run-queue wait other threads"] = (
        1000 * (sum(waits_by_thread.values()) - waits_by_thread.get(main_thread, 0.0)) / steps
    )
    return per_step


@dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """What every run of the benchmark shared, for the tables' titles and notes."""

    workload: Workload
    schedule: str
    warmup: int
    steps: int
    costs: StageCosts
    boundaries: Mapping[int, tuple[int, ...]]
    """Block boundaries of the pipeline stages, per M."""


def print_tables(
    console: Console, setting: Setting, runs: list[Run], summary: dict[str, Any], counts: Sequence[int]
) -> None:
    """Print the comparison, the ratios, the CPU table and cetd's waits."""
    costs = setting.costs
    console.print(
        f"stage costs (fwd+bwd of one micro-batch, one thread): embedding {1000 * costs.embedding:.1f} ms, "
        f"blocks {', '.join(f'{1000 * b:.1f}' for b in costs.blocks)} ms, head+loss {1000 * costs.head:.1f} ms"
    )
    for m in counts:
        boundaries = setting.boundaries[m]
        predicted = stage_seconds(costs, boundaries, m)
        even = stage_seconds(costs, (0, len(costs.blocks) // 2, len(costs.blocks)), m)
        console.print(
            f"M={m}: split {list(boundaries)} predicts stages {', '.join(f'{s:.2f}' for s in predicted)} s/step "
            f"(even split {', '.join(f'{s:.2f}' for s in even)} s: last stage {even[1] / even[0]:.2f}× the first)"
        )
    table = Table(title=f"GPT-2 {setting.workload.layers}×{setting.workload.hidden}, micro-batch "
                        f"{setting.workload.micro_batch}×{setting.workload.seq_len}, {setting.schedule}, "
                        f"{setting.warmup} warm-up + {setting.steps} timed steps, median of rounds")
    columns = ("M", "contender", "samples/s", "step s (median)", "× single", "run-queue wait", "adjusted samples/s",
               "adjusted × single", "step-1 loss")
    for column in columns:
        table.add_column(column, justify="right")
    for m in counts:
        row = summary[str(m)]
        for contender in CONTENDERS:
            rate = row["samples_per_second"][contender]
            adjusted = row["adjusted_samples_per_second"][contender]
            steps = [s for r in runs if r.micro_batches == m and r.contender == contender for s in r.timed]
            loss = row["step1_loss"][contender]
            table.add_row(
                str(m), contender, f"{rate:.1f}", f"{_median(steps):.3f}",
                f"{rate / row['samples_per_second']['single']:.2f}", f"{100 * row['wait_share'][contender]:.0f}%",
                f"{adjusted:.1f}", f"{adjusted / row['adjusted_samples_per_second']['single']:.2f}",
                f"{loss:.6f}" if loss else "",
            )
        table.add_section()
    console.print(table)
    ratios = Table(title="cetd ratios (floors checked at the largest M; adjusted: without other load, estimated)")
    for column in ("M", "cetd / single", "cetd / torch", "torch / single", "adjusted: cetd / single",
                   "cetd / torch", "torch / single", "bound 2M/(M+1)"):
        ratios.add_column(column, justify="right")
    for m in counts:
        row = summary[str(m)]
        ratios.add_row(str(m), *(f"{row[key]:.2f}" for key in (
            "cetd_over_single", "cetd_over_torch", "torch_over_single", "adjusted_cetd_over_single",
            "adjusted_cetd_over_torch", "adjusted_torch_over_single", "bound_2m_over_m_plus_1")))
    console.print(ratios)
    console.print("run-queue wait: time the compute threads were ready to run but waited for their core (other load "
                  "on the machine), as a share of the timed wall time; adjusted samples/s remove that share")
    cpu = Table(title="CPU seconds per timed step of each compute process: main thread + other threads "
                      "(first round; little changed by other load)")
    for column in ("M", "contender", "process 1", "process 2", "CPU-model × single"):
        cpu.add_column(column, justify="right")
    for m in counts:
        single = next((r for r in runs if r.micro_batches == m and r.contender == "single"), None)
        for contender in CONTENDERS:
            run = next((r for r in runs if r.micro_batches == m and r.contender == contender), None)
            if run is None:
                continue
            cells = [f"{main:.3f} + {other:.3f}" for main, other in run.cpu_per_step]
            bound = f"{cpu_model_step(single) / cpu_model_step(run):.2f}" if single is not None else ""
            cpu.add_row(str(m), contender, *cells, *([""] * (2 - len(cells))), bound)
        cpu.add_section()
    console.print(cpu)
    console.print("CPU-model: step = slowest process's CPU + fastest process's CPU / M (the 1F1B fill and drain), "
                  "all threads counted since they share the core; a contention-free estimate that ignores waits")
    if "cetd" not in {r.contender for r in runs}:
        return
    waits = Table(title="cetd: where each process's main thread went, ms per timed step (first round)")
    waits.add_column("M")
    waits.add_column("process")
    waits.add_column("breakdown", justify="left")
    for m in counts:
        run = next(r for r in runs if r.micro_batches == m and r.contender == "cetd")  # first round
        labelled = [("driver", run.stats["driver"])] + [
            (f"stage {i}", s) for i, s in enumerate(run.stats["workers"])
        ]
        for label, stats in labelled:
            parts = _seconds_breakdown(stats, setting.steps)
            text = ", ".join(f"{k} {v:.1f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 0.5)
            waits.add_row(str(m), label, text)
    console.print(waits)
