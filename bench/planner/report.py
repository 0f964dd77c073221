"""The planner benchmark's results: one row per measured partition, the verdicts against the floors, the tables.

A `Row` is one partition with every measured run of it and three predictions of its step time: the
planner's cost model fed the daemon's raw profile (``raw``), fed the load-free profile (``load_free``),
and fed the load-free profile with the head and embedding constants calibrated on the measured part
costs (``calibrated``). Measured step times are the median of the pooled timed steps (wall, at the
driver); the CPU-model step is `bench.planner.analysis.cpu_model_step`'s load-free estimate.
`verdicts` computes the issue's two ratios both ways — raw wall time with the raw planner, and CPU-model
time with the load-free planner — and `print_tables` shows it all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.planner.analysis import Candidate, median_cpu_model, pooled_median_step
from bench.planner.rig import JobRun

__all__ = ["EVEN_FLOOR", "OPTIMAL_FLOOR", "VIEWS", "Row", "print_tables", "verdicts"]

EVEN_FLOOR = 1.3
"""The planner's partition must train at least this many times faster than the even split."""
OPTIMAL_FLOOR = 0.9
"""… and reach at least this share of the best measured partition's samples/s (within 10%)."""


@dataclass(slots=True, kw_only=True)
class Row:
    """One partition: its predictions and its measured runs."""

    candidate: Candidate
    predicted: dict[str, float]
    """``raw``, ``load_free``, ``calibrated`` → predicted step seconds."""
    source: str = ""
    """Why it is measured: ``exhaustive``, a planner's ``pick``, or the model's top N of another order."""
    tags: list[str] = field(default_factory=list)
    runs: list[JobRun] = field(default_factory=list)

    def measured_step(self) -> float:
        return pooled_median_step(self.runs)

    def cpu_model_step(self, fractions: Mapping[str, float], micro_batches: int) -> float:
        return median_cpu_model(self.runs, fractions, micro_batches)

    def to_dict(self, fractions: Mapping[str, float], micro_batches: int, global_batch: int) -> dict[str, Any]:
        measured = self.measured_step()
        return {
            "partition": self.candidate.key, "chain": list(self.candidate.chain),
            "ranges": [list(r) for r in self.candidate.ranges], "blocks_per_stage": self.candidate.blocks,
            "tags": self.tags, "source": self.source, "predicted_step_seconds": self.predicted,
            "measured_step_seconds": measured, "samples_per_second": global_batch / measured,
            "cpu_model_step_seconds": self.cpu_model_step(fractions, micro_batches),
            "runs": [r.to_dict() for r in self.runs],
        }


VIEWS = {
    "wall": "measured wall time, planner fed the raw profile (the daemon's input)",
    "wall_fastest_run": "wall time of each partition's fastest run (other load only adds time), same planner",
    "cpu_model": "CPU-model (load-free), planner fed the load-free profile",
    "cpu_model_calibrated": "CPU-model, planner fed the load-free profile with head/embedding calibrated (diagnosis)",
}
"""The verdicts: which step time is compared, and which planner's pick."""


def _find(rows: Sequence[Row], tag: str) -> Row:
    return next(r for r in rows if tag in r.tags)


def verdicts(rows: Sequence[Row], fractions: Mapping[str, float], micro_batches: int) -> dict[str, Any]:
    """The issue's ratios on raw wall time (raw planner) and on the CPU model (load-free planner)."""
    out: dict[str, Any] = {}
    def wall(row: Row) -> float:
        return row.measured_step()

    def cpu(row: Row) -> float:
        return row.cpu_model_step(fractions, micro_batches)

    def fastest(row: Row) -> float:
        return min(run.median_step for run in row.runs)

    measures: list[tuple[str, str, Callable[[Row], float]]] = [
        ("wall", "planner", wall), ("wall_fastest_run", "planner", fastest), ("cpu_model", "planner (load-free)", cpu),
        ("cpu_model_calibrated", "planner (calibrated)", cpu)]
    for label, planner_tag, measure in measures:
        planner, even = _find(rows, planner_tag), _find(rows, "even")
        best = min(rows, key=measure)
        over_even = measure(even) / measure(planner)
        of_best = measure(best) / measure(planner)
        out[label] = {
            "planner": planner.candidate.key, "even": even.candidate.key, "best": best.candidate.key,
            "planner_step_seconds": measure(planner), "even_step_seconds": measure(even),
            "best_step_seconds": measure(best),
            "planner_over_even": over_even, "planner_share_of_best": of_best,
            "floors_met": {"planner_over_even": over_even >= EVEN_FLOOR, "within_10_percent_of_best": of_best >= OPTIMAL_FLOOR},
        }
    return out


def _error(predicted: float, measured: float) -> str:
    return f"{100 * (predicted / measured - 1):+.0f}%"


def print_tables(console: Console, rows: Sequence[Row], fractions: Mapping[str, float], micro_batches: int,
                 global_batch: int, summary: Mapping[str, Any]) -> None:
    table = Table(title=f"every measured partition (M={micro_batches}, global batch {global_batch}); step seconds; "
                  "error = predicted / measured − 1", show_lines=False)
    for column in ("partition", "blocks", "role", "runs", "measured s", "samples/s", "pred. raw", "err",
                   "CPU-model s", "pred. load-free", "err", "pred. calibrated", "err", "CPU s/step per stage"):
        table.add_column(column, justify="left" if column in ("partition", "role") else "right")
    for row in sorted(rows, key=lambda r: r.measured_step()):
        measured, cpu = row.measured_step(), row.cpu_model_step(fractions, micro_batches)
        stages = sorted(row.runs[-1].stages, key=lambda s: s.stage)
        table.add_row(
            row.candidate.key, row.candidate.blocks, ", ".join(row.tags) or row.source, str(len(row.runs)), f"{measured:.2f}",
            f"{global_batch / measured:.1f}", f"{row.predicted['raw']:.2f}", _error(row.predicted["raw"], measured),
            f"{cpu:.2f}", f"{row.predicted['load_free']:.2f}", _error(row.predicted["load_free"], cpu),
            f"{row.predicted['calibrated']:.2f}", _error(row.predicted["calibrated"], cpu),
            " / ".join(f"{s.cpu_seconds_per_step:.2f}" for s in stages),
        )
    console.print(table)
    for label, title in VIEWS.items():
        v = summary[label]
        met = v["floors_met"]
        console.print(
            f"[bold]{title}[/]: planner {v['planner']} {v['planner_step_seconds']:.2f} s; even {v['even']} "
            f"{v['even_step_seconds']:.2f} s; best {v['best']} {v['best_step_seconds']:.2f} s\n"
            f"  planner/even {v['planner_over_even']:.2f}× (≥ {EVEN_FLOOR}: "
            f"{'ok' if met['planner_over_even'] else 'MISSED'}); planner/best {v['planner_share_of_best']:.2f} "
            f"(≥ {OPTIMAL_FLOOR}: {'ok' if met['within_10_percent_of_best'] else 'MISSED'})"
        )
