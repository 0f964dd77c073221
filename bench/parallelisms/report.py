"""Tables, JSON and the chart of a parallelism study, in the spirit of the paper's Figures 5 and 6.

The chart has one column per device set and two rows — seconds per sample and joules per sample — with
bars grouped by model (smallest first) and one bar per parallelism; a job that could not run (refused
by the planner for memory, or killed by the OOM killer) gets no bar but a red ✗ and its status.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .jobs import MISS, JobOutcome

PARALLELISMS = ("single", "data", "tensor", "pipeline")
_COLOURS = {"single": "#7f7f7f", "data": "#1f77b4", "tensor": "#d62728", "pipeline": "#2ca02c"}


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _placement(outcome: JobOutcome) -> str:
    if not outcome.workers:
        return ""
    if outcome.parallelism == "pipeline":
        return " ".join(f"h{w['host']}·{w['cpu_fraction']:.0%}:{w['blocks'][1] - w['blocks'][0]}"
                        for w in sorted(outcome.workers, key=lambda w: w["stage"]))
    return " ".join(f"h{w['host']}·{w['cpu_fraction']:.0%}" for w in outcome.workers)


def _runs(outcome: JobOutcome) -> str:
    """Every run's forecast error, then the pooled error and how far the runs' measurements spread."""
    runs, pooled, spread = outcome.runs, outcome.pooled_error, outcome.spread
    if pooled is None:
        return "—"
    each = " ".join(f"{p / m - 1:+.0%}" for m, p in runs)
    return each if spread is None else f"{each} → {pooled:+.0%} · {spread:.0%}"


def print_tables(outcomes: Sequence[JobOutcome], console: Console) -> None:
    """One table per device set; then which parallelism wins per model on time and on energy."""
    for device_set in dict.fromkeys(o.device_set for o in outcomes):
        table = Table(title=f"{device_set} devices — steady state (steps 2..N)")
        for column in ("model", "parallelism", "status", "s/sample", "J/sample (bench)", "s/sample (cetctl)",
                       "J/sample (cetctl)", "predicted s/sample", "error per run → pooled · spread",
                       "placement host·CPU[:blocks]"):
            table.add_column(column, justify="left" if column in ("model", "parallelism", "status") else "right")
        rows = [o for o in outcomes if o.device_set == device_set]
        for outcome in rows:
            status = outcome.status if outcome.status == "ok" else f"[red]{outcome.status.upper()}[/]"
            table.add_row(outcome.model, outcome.parallelism, status, _number(outcome.seconds_per_sample),
                          _number(outcome.bench_joules_per_sample), _number(outcome.product_seconds_per_sample),
                          _number(outcome.product_joules_per_sample), _number(outcome.predicted_seconds_per_sample),
                          _runs(outcome), _placement(outcome))
        console.print(table)
        for model in dict.fromkeys(o.model for o in rows):
            ran = [o for o in rows if o.model == model and o.seconds_per_sample and o.bench_joules_per_sample]
            failed = [o.parallelism for o in rows if o.model == model and o.status != "ok"]
            if not ran:
                console.print(f"  {model}: nothing ran ({', '.join(failed)})")
                continue
            fastest = min(ran, key=lambda o: o.seconds_per_sample or math.inf)
            thriftiest = min(ran, key=lambda o: o.bench_joules_per_sample or math.inf)
            order = " < ".join(o.parallelism for o in sorted(ran, key=lambda o: o.bench_joules_per_sample or 0))
            console.print(f"  {model}: fastest {fastest.parallelism}, least energy {thriftiest.parallelism} "
                          f"(J/sample {order})" + (f"; could not run: {', '.join(failed)}" if failed else ""))
        for error_outcome in (o for o in rows if o.status not in ("ok", "refused") and o.reason):
            console.print(f"  [red]{error_outcome.model} {error_outcome.parallelism}[/]: {error_outcome.reason}")


def prediction_summary(outcomes: Sequence[JobOutcome]) -> dict[str, Any]:
    """Median and range of predicted/measured − 1 over each job's runs (`JobOutcome.pooled_error`), per
    parallelism and overall; the same over first runs alone (``first_run``); how far runs spread."""
    def stats(errors: list[float]) -> dict[str, Any]:
        if not errors:
            return {"jobs": 0}
        ordered = sorted(errors)
        middle = len(ordered) // 2
        median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        return {"jobs": len(errors), "median": median, "min": ordered[0], "max": ordered[-1],
                "median_abs": sorted(abs(e) for e in errors)[middle],
                "within": sum(abs(e) <= MISS for e in errors)}

    summary = {p: stats([e for o in outcomes if o.parallelism == p and (e := o.pooled_error) is not None])
               for p in PARALLELISMS}
    summary["all"] = stats([e for o in outcomes if (e := o.pooled_error) is not None])
    summary["first_run"] = stats([e for o in outcomes if (e := o.prediction_error) is not None])
    spreads = sorted(s for o in outcomes if (s := o.spread) is not None)
    summary["spread"] = {"jobs": len(spreads)} if not spreads else {
        "jobs": len(spreads), "median": spreads[len(spreads) // 2], "max": spreads[-1]}
    return summary


def write_json(path: Path, meta: dict[str, Any], outcomes: Sequence[JobOutcome]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    jobs = [{**asdict(o), "prediction_error": o.prediction_error, "pooled_error": o.pooled_error,
             "spread": o.spread} for o in outcomes]
    path.write_text(json.dumps({**meta, "prediction_error": prediction_summary(outcomes), "jobs": jobs}, indent=2)
                    + "\n")


def plot(path: Path, outcomes: Sequence[JobOutcome], *, title: str) -> None:
    """Grouped bars per model: s/sample (top) and J/sample (bottom), one column per device set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device_sets = list(dict.fromkeys(o.device_set for o in outcomes))
    models = list(dict.fromkeys(o.model for o in outcomes))
    figure, axes = plt.subplots(2, len(device_sets), figsize=(6.5 * len(device_sets), 8), squeeze=False)
    width = 0.8 / len(PARALLELISMS)
    metrics = (("seconds_per_sample", "seconds per sample"), ("bench_joules_per_sample", "joules per sample"))
    for column, device_set in enumerate(device_sets):
        found = {(o.model, o.parallelism): o for o in outcomes if o.device_set == device_set}
        for row, (attribute, label) in enumerate(metrics):
            axis = axes[row][column]
            values = [getattr(o, attribute) for o in found.values() if getattr(o, attribute)]
            floor = min(values) / 3 if values else 1e-3
            for k, parallelism in enumerate(PARALLELISMS):
                xs = [i + (k - (len(PARALLELISMS) - 1) / 2) * width for i in range(len(models))]
                heights = []
                for x, model in zip(xs, models, strict=True):
                    outcome = found.get((model, parallelism))
                    value = getattr(outcome, attribute) if outcome else None
                    heights.append(value or 0.0)
                    if outcome is not None and not value:
                        mark = "OOM" if outcome.status in ("refused", "oom") else outcome.status
                        axis.text(x, floor * 1.15, f"✗ {mark}", color="red", rotation=90, ha="center",
                                  va="bottom", fontsize=8, fontweight="bold")
                axis.bar(xs, [h if h else math.nan for h in heights], width, label=parallelism,
                         color=_COLOURS[parallelism])
            axis.set_yscale("log")
            axis.set_ylim(bottom=floor)
            axis.set_xticks(range(len(models)), models)
            axis.set_ylabel(label)
            axis.set_title(f"{device_set} devices: {label}")
            axis.grid(axis="y", which="both", alpha=0.3)
            if row == 0 and column == 0:
                axis.legend(title="parallelism")
    figure.suptitle("\n".join(textwrap.wrap(title, width=60 * len(device_sets))), fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
