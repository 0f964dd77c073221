"""The jobs service: servicer (wire → `JobsHandler`) and the typed client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, Protocol

import grpc

from cetd.ids import DeviceId
from cetd.transport import jobs_codec as codec
from cetd.transport.auth import CALLER
from cetd.transport.household_client import DEFAULT_TIMEOUT, call_rpc, error_from_rpc
from cetd.transport.household_server import answer
from cetd.transport.job_types import (
    JobEvent,
    JobStatus,
    LaunchResult,
    PlanAnswer,
    ProfileAnswer,
    ProfileQuery,
    WorkerEndpoint,
    WorkerLaunch,
    WorkerUsage,
)
from cetd.wire import jobs_pb2 as pb
from cetd.wire import jobs_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Jobs"].full_name
PLAN_TIMEOUT = timedelta(minutes=15)
"""How long `cetctl plan` waits for the coordinator: a model's first plan of the week times every device's
shapes and then its transport twice more (`cetd.daemon.shape_profiles`), one device at a time where daemons
share a machine; four at 0.45 of a core on the study's testbed took 4.7 minutes."""
LAUNCH_TIMEOUT = PLAN_TIMEOUT + timedelta(minutes=3)
"""How long a submitter waits for the coordinator to launch its job: the same plan (a fresh household's first
`cetctl train` times every device as `cetctl plan` would), then the workers' start."""


class JobsHandler(Protocol):
    """What the daemon does with job calls; ``caller`` is the authenticated device that called."""

    async def submit(self, spec_json: str, caller: DeviceId) -> JobStatus: ...
    def watch(self, job_id: str) -> AsyncIterator[JobEvent]: ...
    async def list_jobs(self) -> list[JobStatus]: ...
    async def get(self, job_id: str) -> JobStatus: ...
    async def cancel(self, job_id: str) -> JobStatus: ...
    async def launch(self, job_id: str, spec_json: str, description_json: str, exclude: tuple[str, ...],
                     resume: bool, caller: DeviceId) -> LaunchResult: ...
    async def start_worker(self, launch: WorkerLaunch, caller: DeviceId) -> str: ...
    async def connect_worker(self, term: int, coordinator_id: str, job_id: str,
                             endpoints: tuple[WorkerEndpoint, ...], caller: DeviceId) -> None: ...
    async def stop_worker(self, job_id: str, caller: DeviceId) -> WorkerUsage: ...
    async def report(self, status: JobStatus, caller: DeviceId) -> None: ...
    async def leave(self, job_id: str, device_id: str, caller: DeviceId) -> None: ...
    async def drain(self, device_id: str, caller: DeviceId) -> list[str]: ...
    async def plan(self, spec_json: str, description_json: str, remove: tuple[str, ...], add_json: str,
                   caller: DeviceId) -> PlanAnswer: ...
    async def worker_failed(self, job_id: str, device_id: str, reason: str, fatal: bool,
                            caller: DeviceId) -> None: ...
    async def profile(self, request: ProfileQuery, caller: DeviceId) -> ProfileAnswer: ...
    async def echo(self, address: str, caller: DeviceId) -> str: ...


class JobsServicer(pb_grpc.JobsServicer):
    def __init__(self, handler: JobsHandler) -> None:
        self._handler = handler

    async def Submit(self, request: pb.SubmitRequest, context: Context) -> pb.JobStatus:
        status = await answer(context, self._handler.submit(request.spec_json, CALLER.get()))
        return codec.status_to_wire(status)

    async def Watch(self, request: pb.WatchRequest, context: Context) -> AsyncIterator[pb.JobEvent]:
        async for event in self._handler.watch(request.job_id):
            yield codec.event_to_wire(event)

    async def List(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        jobs = await answer(context, self._handler.list_jobs())
        return pb.ListJobsResponse(jobs=[codec.status_to_wire(j) for j in jobs])

    async def Get(self, request: pb.JobRequest, context: Context) -> pb.JobStatus:
        return codec.status_to_wire(await answer(context, self._handler.get(request.job_id)))

    async def Cancel(self, request: pb.JobRequest, context: Context) -> pb.JobStatus:
        return codec.status_to_wire(await answer(context, self._handler.cancel(request.job_id)))

    async def Launch(self, request: pb.LaunchRequest, context: Context) -> pb.LaunchResponse:
        result = await answer(context, self._handler.launch(
            request.job_id, request.spec_json, request.description_json, tuple(request.exclude), request.resume,
            CALLER.get()))
        return codec.launch_result_to_wire(result)

    async def StartWorker(self, request: pb.StartWorkerRequest, context: Context) -> pb.StartWorkerResponse:
        address = await answer(context, self._handler.start_worker(
            codec.worker_launch_from_wire(request), CALLER.get()))
        return pb.StartWorkerResponse(address=address)

    async def ConnectWorker(self, request: pb.ConnectWorkerRequest, context: Context) -> pb.WorkerAck:
        await answer(context, self._handler.connect_worker(
            request.term, request.coordinator_id, request.job_id, codec.endpoints_from_wire(request.endpoints),
            CALLER.get()))
        return pb.WorkerAck()

    async def StopWorker(self, request: pb.JobRequest, context: Context) -> pb.WorkerAck:
        usage = await answer(context, self._handler.stop_worker(request.job_id, CALLER.get()))
        return pb.WorkerAck(cpu_seconds=usage.cpu_seconds, startup_cpu_seconds=usage.startup_cpu_seconds,
                            wall_seconds=usage.wall_seconds, joules=usage.joules, energy_source=usage.energy_source,
                            failure=usage.failure, fatal=usage.fatal)

    async def Report(self, request: pb.JobReport, context: Context) -> pb.WorkerAck:
        await answer(context, self._handler.report(codec.status_from_wire(request.status), CALLER.get()))
        return pb.WorkerAck()


    async def Leave(self, request: pb.LeaveRequest, context: Context) -> pb.WorkerAck:
        await answer(context, self._handler.leave(request.job_id, request.device_id, CALLER.get()))
        return pb.WorkerAck()

    async def Drain(self, request: pb.DrainRequest, context: Context) -> pb.DrainResponse:
        jobs = await answer(context, self._handler.drain(request.device_id, CALLER.get()))
        return pb.DrainResponse(jobs=jobs)


    async def Plan(self, request: pb.PlanRequest, context: Context) -> pb.PlanResponse:
        result = await answer(context, self._handler.plan(request.spec_json, request.description_json,
                                                          tuple(request.remove), request.add_json, CALLER.get()))
        return pb.PlanResponse(plan_json=result.plan_json, prediction_json=result.prediction_json,
                               left_out_json=result.left_out_json)


    async def WorkerFailed(self, request: pb.WorkerFailure, context: Context) -> pb.WorkerAck:
        await answer(context, self._handler.worker_failed(request.job_id, request.device_id, request.reason,
                                                          request.fatal, CALLER.get()))
        return pb.WorkerAck()

    async def Profile(self, request: pb.ProfileRequest, context: Context) -> pb.ProfileResponse:
        query = ProfileQuery(description_json=request.description_json, micro_batch=request.micro_batch,
                             seq_len=request.seq_len, precision=request.precision, measure=request.measure,
                             again=request.again)
        result = await answer(context, self._handler.profile(query, CALLER.get()))
        return pb.ProfileResponse(times_json=result.times_json, reason=result.reason,
                                  samples=result.samples)

    async def Echo(self, request: pb.EchoRequest, context: Context) -> pb.EchoResponse:
        address = await answer(context, self._handler.echo(request.address, CALLER.get()))
        return pb.EchoResponse(address=address)


def add_jobs_service(handler: JobsHandler) -> Any:
    """A `ServicerAdder` for `MemberEndpoint`."""

    def add(server: grpc.aio.Server) -> None:
        pb_grpc.add_JobsServicer_to_server(JobsServicer(handler), server)

    return add


class JobsClient:
    """Calls the jobs service of one member over an existing mutual-TLS channel."""

    def __init__(self, channel: grpc.aio.Channel, target: str) -> None:
        self._stub = pb_grpc.JobsStub(channel)
        self._target = target

    async def submit(self, spec_json: str, timeout: timedelta = timedelta(minutes=5)) -> JobStatus:
        reply = await call_rpc(self._target, self._stub.Submit(pb.SubmitRequest(spec_json=spec_json),
                                                            timeout=timeout.total_seconds()))
        return codec.status_from_wire(reply)

    async def watch(self, job_id: str) -> AsyncIterator[JobEvent]:
        call = self._stub.Watch(pb.WatchRequest(job_id=job_id))
        try:
            async for event in call:
                yield codec.event_from_wire(event)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, self._target) from None

    async def list_jobs(self, timeout: timedelta = DEFAULT_TIMEOUT) -> list[JobStatus]:
        reply = await call_rpc(self._target, self._stub.List(pb.ListJobsRequest(), timeout=timeout.total_seconds()))
        return [codec.status_from_wire(j) for j in reply.jobs]

    async def get(self, job_id: str, timeout: timedelta = DEFAULT_TIMEOUT) -> JobStatus:
        reply = await call_rpc(self._target, self._stub.Get(pb.JobRequest(job_id=job_id),
                                                         timeout=timeout.total_seconds()))
        return codec.status_from_wire(reply)

    async def cancel(self, job_id: str, timeout: timedelta = timedelta(seconds=30)) -> JobStatus:
        reply = await call_rpc(self._target, self._stub.Cancel(pb.JobRequest(job_id=job_id),
                                                            timeout=timeout.total_seconds()))
        return codec.status_from_wire(reply)

    async def launch(self, job_id: str, spec_json: str, description_json: str, exclude: tuple[str, ...] = (),
                     resume: bool = False, timeout: timedelta = LAUNCH_TIMEOUT) -> LaunchResult:
        request = pb.LaunchRequest(job_id=job_id, spec_json=spec_json, description_json=description_json,
                                   exclude=list(exclude), resume=resume)
        reply = await call_rpc(self._target, self._stub.Launch(request, timeout=timeout.total_seconds()))
        return codec.launch_result_from_wire(reply)

    async def start_worker(self, launch: WorkerLaunch, timeout: timedelta = timedelta(minutes=2)) -> str:
        reply = await call_rpc(self._target, self._stub.StartWorker(codec.worker_launch_to_wire(launch),
                                                                 timeout=timeout.total_seconds()))
        return reply.address

    async def connect_worker(self, term: int, coordinator_id: str, job_id: str,
                             endpoints: tuple[WorkerEndpoint, ...], timeout: timedelta = DEFAULT_TIMEOUT) -> None:
        request = pb.ConnectWorkerRequest(term=term, coordinator_id=coordinator_id, job_id=job_id,
                                          endpoints=codec.endpoints_to_wire(endpoints))
        await call_rpc(self._target, self._stub.ConnectWorker(request, timeout=timeout.total_seconds()))

    async def stop_worker(self, job_id: str, timeout: timedelta = DEFAULT_TIMEOUT) -> WorkerUsage:
        reply = await call_rpc(self._target, self._stub.StopWorker(pb.JobRequest(job_id=job_id),
                                                                timeout=timeout.total_seconds()))
        return WorkerUsage(cpu_seconds=reply.cpu_seconds, startup_cpu_seconds=reply.startup_cpu_seconds,
                           wall_seconds=reply.wall_seconds, joules=reply.joules, energy_source=reply.energy_source,
                           failure=reply.failure, fatal=reply.fatal)

    async def report(self, status: JobStatus, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
        await call_rpc(self._target, self._stub.Report(pb.JobReport(status=codec.status_to_wire(status)),
                                                    timeout=timeout.total_seconds()))

    async def leave(self, job_id: str, device_id: str, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
        await call_rpc(self._target, self._stub.Leave(pb.LeaveRequest(job_id=job_id, device_id=device_id),
                                                      timeout=timeout.total_seconds()))

    async def drain(self, device_id: str, timeout: timedelta = timedelta(seconds=30)) -> list[str]:
        reply = await call_rpc(self._target, self._stub.Drain(pb.DrainRequest(device_id=device_id),
                                                              timeout=timeout.total_seconds()))
        return list(reply.jobs)

    async def plan(self, spec_json: str, description_json: str = "", remove: tuple[str, ...] = (),
                   add_json: str = "", timeout: timedelta = PLAN_TIMEOUT) -> PlanAnswer:
        request = pb.PlanRequest(spec_json=spec_json, description_json=description_json, remove=list(remove),
                                 add_json=add_json)
        reply = await call_rpc(self._target, self._stub.Plan(request, timeout=timeout.total_seconds()))
        return PlanAnswer(plan_json=reply.plan_json, prediction_json=reply.prediction_json,
                          left_out_json=reply.left_out_json)

    async def worker_failed(self, job_id: str, device_id: str, reason: str, fatal: bool,
                            timeout: timedelta = DEFAULT_TIMEOUT) -> None:
        request = pb.WorkerFailure(job_id=job_id, device_id=device_id, reason=reason, fatal=fatal)
        await call_rpc(self._target, self._stub.WorkerFailed(request, timeout=timeout.total_seconds()))

    async def profile(self, query: ProfileQuery, timeout: timedelta = timedelta(minutes=2)) -> ProfileAnswer:
        request = pb.ProfileRequest(description_json=query.description_json, micro_batch=query.micro_batch,
                                    seq_len=query.seq_len, precision=query.precision, measure=query.measure,
                                    again=query.again)
        reply = await call_rpc(self._target, self._stub.Profile(request, timeout=timeout.total_seconds()))
        return ProfileAnswer(times_json=reply.times_json, reason=reply.reason, samples=reply.samples)

    async def echo(self, address: str, timeout: timedelta = timedelta(minutes=4)) -> str:
        """Ask this member to echo a transport profile listening at ``address``; its echo's address."""
        reply = await call_rpc(self._target, self._stub.Echo(pb.EchoRequest(address=address),
                                                          timeout=timeout.total_seconds()))
        return reply.address
