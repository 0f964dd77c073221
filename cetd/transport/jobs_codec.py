"""Conversion between the jobs wire messages and `job_types`."""

from __future__ import annotations

from cetd.transport.job_types import (
    JobEvent,
    JobState,
    JobStatus,
    LaunchResult,
    StepProgress,
    WorkerEndpoint,
    WorkerLaunch,
)
from cetd.wire import jobs_pb2 as pb


def status_to_wire(status: JobStatus) -> pb.JobStatus:
    return pb.JobStatus(
        job_id=status.job_id, state=status.state.value, reason=status.reason, spec_json=status.spec_json,
        plan_json=status.plan_json, submitter_id=status.submitter_id, steps_done=status.steps_done,
        steps_total=status.steps_total, last_loss=status.last_loss,
        seconds_per_sample=status.seconds_per_sample, joules_per_sample=status.joules_per_sample,
        energy_source=status.energy_source, output=status.output, created_at=status.created_at,
        finished_at=status.finished_at, term=status.term, checkpoints=list(status.checkpoints),
        recoveries_json=status.recoveries_json, energy_json=status.energy_json,
    )


def status_from_wire(msg: pb.JobStatus) -> JobStatus:
    try:
        state = JobState(msg.state)
    except ValueError:
        state = JobState.FAILED
    return JobStatus(
        job_id=msg.job_id, state=state, reason=msg.reason, spec_json=msg.spec_json, plan_json=msg.plan_json,
        submitter_id=msg.submitter_id, steps_done=msg.steps_done, steps_total=msg.steps_total,
        last_loss=msg.last_loss, seconds_per_sample=msg.seconds_per_sample,
        joules_per_sample=msg.joules_per_sample, energy_source=msg.energy_source, output=msg.output,
        created_at=msg.created_at, finished_at=msg.finished_at, term=msg.term,
        checkpoints=tuple(msg.checkpoints), recoveries_json=msg.recoveries_json or "[]",
        energy_json=msg.energy_json or "{}",
    )


def event_to_wire(event: JobEvent) -> pb.JobEvent:
    msg = pb.JobEvent(status=status_to_wire(event.status))
    if event.step is not None:
        msg.step.CopyFrom(pb.StepProgress(step=event.step.step, loss=event.step.loss,
                                          seconds=event.step.seconds, samples=event.step.samples))
    return msg


def event_from_wire(msg: pb.JobEvent) -> JobEvent:
    step = None
    if msg.HasField("step"):
        step = StepProgress(step=msg.step.step, loss=msg.step.loss, seconds=msg.step.seconds,
                            samples=msg.step.samples)
    return JobEvent(status=status_from_wire(msg.status), step=step)


def endpoints_to_wire(endpoints: tuple[WorkerEndpoint, ...] | list[WorkerEndpoint]) -> list[pb.WorkerEndpoint]:
    return [pb.WorkerEndpoint(rank=e.rank, device_id=e.device_id, address=e.address) for e in endpoints]


def endpoints_from_wire(msgs: object) -> tuple[WorkerEndpoint, ...]:
    return tuple(
        WorkerEndpoint(rank=m.rank, device_id=m.device_id, address=m.address)
        for m in msgs  # type: ignore[attr-defined]  # a repeated field of WorkerEndpoint
    )


def launch_result_to_wire(result: LaunchResult) -> pb.LaunchResponse:
    return pb.LaunchResponse(plan_json=result.plan_json, endpoints=endpoints_to_wire(result.endpoints),
                             term=result.term)


def launch_result_from_wire(msg: pb.LaunchResponse) -> LaunchResult:
    return LaunchResult(plan_json=msg.plan_json, endpoints=endpoints_from_wire(msg.endpoints), term=msg.term)


def worker_launch_to_wire(launch: WorkerLaunch) -> pb.StartWorkerRequest:
    return pb.StartWorkerRequest(
        term=launch.term, coordinator_id=launch.coordinator_id, job_id=launch.job_id, rank=launch.rank,
        spec_json=launch.spec_json, plan_json=launch.plan_json, description_json=launch.description_json,
        submitter_id=launch.submitter_id,
    )


def worker_launch_from_wire(msg: pb.StartWorkerRequest) -> WorkerLaunch:
    return WorkerLaunch(
        term=msg.term, coordinator_id=msg.coordinator_id, job_id=msg.job_id, rank=msg.rank,
        spec_json=msg.spec_json, plan_json=msg.plan_json, description_json=msg.description_json,
        submitter_id=msg.submitter_id,
    )
