"""`cetctl train`, `jobs`, `status` and `cancel`: start a training job, watch it, stop it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cetd.errors import JobError
from cetd.identity import short_id
from cetd.runtime.spec import JobSpec, to_json
from cetd.transport.household_client import PeerClient
from cetd.transport.job_types import JobState, JobStatus
from cetd.transport.jobs_service import JobsClient


def _jobs(client: PeerClient) -> JobsClient:
    return JobsClient(client.channel, client.address)


def _local_path(text: str) -> str:
    """Paths are resolved here, on the submitting device, where the daemon that runs the driver lives."""
    return str(Path(text).expanduser().resolve())


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    model = args.model
    if Path(model).expanduser().exists() or "/" in model:
        model = _local_path(model)
    return JobSpec(
        model=model, data=_local_path(args.data), output=_local_path(args.output) if args.output else "",
        steps=args.steps, global_batch=args.batch, micro_batches=args.micro_batches, seq_len=args.seq_len,
        lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, parallelism=args.parallelism,
        devices=args.devices, schedule=args.schedule, sync_every=args.sync_every, replicas=args.replicas,
        precision=args.precision,
        checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds,
        keep_checkpoints=args.keep_checkpoints, objective=args.objective,
    )


def status_dict(status: JobStatus) -> dict[str, Any]:
    data = asdict(status)
    data["state"] = status.state.value
    data["spec"] = json.loads(status.spec_json) if status.spec_json else None
    data["plan"] = json.loads(status.plan_json) if status.plan_json else None
    data["recoveries"] = json.loads(status.recoveries_json or "[]")
    data["energy"] = json.loads(status.energy_json or "{}")
    data["checkpoints"] = list(status.checkpoints)
    del data["spec_json"], data["plan_json"], data["recoveries_json"], data["energy_json"]
    return data


async def cmd_train(client: PeerClient, args: argparse.Namespace) -> int:
    jobs = _jobs(client)
    spec = spec_from_args(args)
    status = await jobs.submit(to_json(spec))
    job_id = status.job_id
    if args.json:
        print(json.dumps({"event": "submitted", "job": status_dict(status)}), flush=True)
    else:
        Console(stderr=True).print(f"job [bold]{job_id}[/] submitted; cancel with: cetctl cancel {job_id}")
    final = status
    progress = None if args.json else Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} samples/s"),
        TimeRemainingColumn(), console=Console(stderr=True), transient=False,
    )
    task = progress.add_task(job_id, total=spec.steps, loss="-", rate="-") if progress else None
    if progress:
        progress.start()
    try:
        async for event in jobs.watch(job_id):
            final = event.status
            if args.json:
                line: dict[str, Any] = {"event": "step" if event.step else "status", "state": final.state.value}
                if event.step:
                    line.update(asdict(event.step))
                print(json.dumps(line), flush=True)
            elif progress is not None and task is not None and event.step is not None:
                rate = event.step.samples / event.step.seconds if event.step.seconds else 0.0
                progress.update(task, completed=event.step.step, loss=f"{event.step.loss:.4f}", rate=f"{rate:.1f}")
            if final.state.finished:
                break
    finally:
        if progress:
            progress.stop()
    return _conclude(final, args)


def _conclude(status: JobStatus, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({"event": "finished", "job": status_dict(status)}), flush=True)
    console = Console(stderr=True)
    if status.state is JobState.SUCCEEDED:
        if not args.json:
            console.print(f"job {status.job_id} succeeded: final loss {status.last_loss:.4f}, "
                          f"{status.seconds_per_sample:.4f} s/sample, {status.joules_per_sample:.3f} J/sample "
                          f"({status.energy_source})" + (f"; model written to {status.output}" if status.output else ""))
        return 0
    if status.state is JobState.CANCELLED:
        print(f"cetctl: job {status.job_id} was cancelled", file=sys.stderr)
        return 130
    print(f"cetctl: job {status.job_id} failed: {status.reason}", file=sys.stderr)
    return JobError.exit_code


async def cmd_jobs(client: PeerClient, args: argparse.Namespace) -> int:
    jobs = await _jobs(client).list_jobs()
    if args.json:
        print(json.dumps([status_dict(j) for j in jobs], indent=2))
        return 0
    table = Table(title="jobs")
    for column in ("job", "state", "steps", "loss", "s/sample", "J/sample", "reason"):
        table.add_column(column)
    for job in jobs:
        table.add_row(job.job_id, job.state.value, f"{job.steps_done}/{job.steps_total}", f"{job.last_loss:.4f}",
                      f"{job.seconds_per_sample:.4f}", f"{job.joules_per_sample:.3f}", job.reason)
    Console().print(table)
    return 0


async def cmd_status(client: PeerClient, args: argparse.Namespace) -> int:
    status = await _jobs(client).get(args.job_id)
    data = status_dict(status)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        console = Console()
        for key, value in data.items():
            if key not in ("spec", "plan", "recoveries", "energy"):
                console.print(f"[bold]{key}[/]: {value}")
        if data["plan"]:
            console.print(f"[bold]plan[/]: {data['plan']['reason']}")
        if data["energy"]:
            table = Table(title=f"energy ({status.energy_source})")
            for column in ("device", "joules", "J/sample", "source", "start-up J (apart)"):
                table.add_column(column)
            for device, row in data["energy"].items():
                table.add_row(short_id(device), f"{row['joules']:.1f}", f"{row['joules_per_sample']:.3f}",
                              row["source"], f"{row.get('startup_joules', 0.0):.1f}")
            console.print(table)
        if data["recoveries"]:
            table = Table(title="recoveries")
            for column in ("when", "failed at", "resumed from", "redone", "re-plan", "reload", "warm-up", "total"):
                table.add_column(column)
            for r in data["recoveries"]:
                table.add_row(time.strftime("%H:%M:%S", time.localtime(r["at"])), f"step {r['failed_step']}",
                              f"step {r['resumed_from']}", str(r["steps_redone"]), f"{r['replan_s']:.1f} s",
                              f"{r['reload_s']:.1f} s", f"{r['warmup_s']:.1f} s", f"{r['recovered_s']:.1f} s")
            console.print(table)
            for number, r in enumerate(data["recoveries"], 1):
                console.print(f"  {number}. {r['cause']}")
    return 0


async def cmd_cancel(client: PeerClient, args: argparse.Namespace) -> int:
    status = await _jobs(client).cancel(args.job_id)
    if args.json:
        print(json.dumps(status_dict(status)))
    else:
        print(f"job {status.job_id}: {status.state.value}")
    return 0


async def cmd_plan(client: PeerClient, args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    added = [_parse_device(text) for text in args.add]
    answer = await _jobs(client).plan(to_json(spec), remove=tuple(args.remove), add_json=json.dumps(added))
    plan = json.loads(answer.plan_json)
    prediction = json.loads(answer.prediction_json)
    left_out = json.loads(answer.left_out_json)
    if args.json:
        print(json.dumps({"plan": plan, "prediction": prediction, "left_out": left_out}, indent=2))
        return 0
    console = Console()
    console.print(f"[bold]{plan['parallelism']}[/] over {len(plan['workers'])} device(s), objective "
                  f"{plan['objective']}: {plan['reason']}")
    console.print(f"predicted: {prediction['seconds_per_sample']:.4f} s/sample, "
                  f"{prediction['joules_per_sample']:.3f} J/sample (model), bottleneck: {prediction['bottleneck']}")
    table = Table(title="shares")
    for column in ("rank", "device", "replica", "blocks", "memory", "ms/block/sample", "busy s/step", "J/step"):
        table.add_column(column)
    for worker in plan["workers"]:
        device = worker["device_id"]
        speed = (f"{prediction.get('block_seconds', {}).get(device, 0) * 1e3:.3f} "
                 f"({prediction.get('speed_source', {}).get(device, '?')})")
        table.add_row(str(worker["rank"]), short_id(device), str(worker.get("dp_index", 0)),
                      f"{worker['start_block']}..{worker['end_block']}",
                      f"{prediction['memory_bytes'].get(device, 0) / 1024**3:.2f} GiB", speed,
                      f"{prediction['busy_seconds'].get(device, 0):.3f}", f"{prediction['joules'].get(device, 0):.2f}")
    console.print(table)
    for device, why in left_out.items():
        console.print(f"left out {device.split('-')[0]}: {why}")
    return 0


def _parse_device(text: str) -> dict[str, Any]:
    """``NAME:CORES:MEMORY_GIB[:PROFILE]`` → a hypothetical device for --what-if."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise JobError(f"--add {text!r}: expected NAME:CORES:MEMORY_GIB[:POWER_PROFILE]")
    try:
        device: dict[str, Any] = {"device_id": parts[0], "cores": int(parts[1]),
                                  "memory_bytes": int(float(parts[2]) * 1024**3)}
    except ValueError:
        raise JobError(f"--add {text!r}: cores must be an integer and memory a number of GiB") from None
    if len(parts) == 4:
        device["power_profile"] = parts[3]
    return device


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="save_pretrained folder, or a preset (gpt2-tiny, minilm, …)")
    parser.add_argument("--data", required=True, help="JSONL text (causal LM) or sentence pairs (JSONL/TSV)")
    parser.add_argument("--output", default="", help="folder for the trained model (save_pretrained)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch (examples per step)")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallelism", choices=["auto", "single", "pipeline", "tensor", "data"], default="auto")
    parser.add_argument("--devices", type=int, default=0, help="devices to use (0: the planner decides)")
    parser.add_argument("--objective", choices=["throughput", "energy"], default="throughput",
                        help="what the planner optimises: seconds or joules per sample")
    parser.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    parser.add_argument("--sync-every", type=int, default=1, help="data parallel: synchronise every k steps")
    parser.add_argument("--replicas", type=int, default=0,
                        help="pipeline × data: copies of the pipeline, each on its share of the micro-batches "
                             "(0: the planner decides, 1: none)")
    parser.add_argument("--precision", choices=["float32", "float64"], default="float32")
    parser.add_argument("--checkpoint-every", type=int, default=5,
                        help="checkpoint every k steps (a failure costs at most the steps since the last one)")
    parser.add_argument("--checkpoint-seconds", type=float, default=0.0, help="also checkpoint every T seconds")
    parser.add_argument("--keep-checkpoints", type=int, default=3, help="complete checkpoints kept per job")


def add_job_commands(sub: Any) -> None:
    train = sub.add_parser("train", help="train a model across the household")
    _add_job_arguments(train)
    train.set_defaults(handler=cmd_train)
    plan = sub.add_parser("plan", help="show the plan and its forecast without running (--what-if)")
    _add_job_arguments(plan)
    plan.add_argument("--what-if", action="store_true", help="(the default) plan only, run nothing")
    plan.add_argument("--remove", action="append", default=[], metavar="DEVICE_ID", help="as if this device left")
    plan.add_argument("--add", action="append", default=[], metavar="NAME:CORES:GIB[:PROFILE]",
                      help="as if such a device joined")
    plan.set_defaults(handler=cmd_plan)
    sub.add_parser("jobs", help="list jobs").set_defaults(handler=cmd_jobs)
    status = sub.add_parser("status", help="one job's state, plan and metrics")
    status.add_argument("job_id")
    status.set_defaults(handler=cmd_status)
    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    cancel.set_defaults(handler=cmd_cancel)
