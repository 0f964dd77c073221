"""GrpcPeerChannel across spawned processes: bit-exact exchange, then a killed peer surfaces in time."""

from __future__ import annotations

import multiprocessing
import time
from datetime import timedelta
from multiprocessing.connection import Connection

import pytest
import torch

from cetd.ids import JobId
from cetd.transport.channel import TensorKey, TensorSpec, TransportError
from cetd.transport.credentials import TlsMaterial
from cetd.transport.tensor_channel import GrpcPeerChannel, TensorChannelConfig
from tests.transport.conftest import TestDevice

torch.set_num_threads(1)

JOB = JobId("job-processes")
SPEC = TensorSpec(dtype=torch.float32, shape=(5 * 1024 * 1024,))  # 20 MiB
CONFIG = TensorChannelConfig(timeout=timedelta(seconds=3))


def _key(name: str) -> TensorKey:
    return TensorKey(step=1, micro_batch=0, name=name)


def _echo_worker(tls: TlsMaterial, peer_tls_name: str, control: Connection) -> None:
    """Rank 1: receive one tensor, send it back doubled, then idle until killed."""
    torch.set_num_threads(1)
    with GrpcPeerChannel(rank=1, world_size=2, job_id=JOB, tls=tls, authorize=lambda pem: True, config=CONFIG) as channel:
        control.send(channel.address)
        channel.connect({0: (control.recv(), peer_tls_name)})
        ping = channel.recv(0, _key("ping"), SPEC, timeout=30)
        channel.send(0, _key("pong"), ping * 2).wait(timeout=30)
        control.send("ready")
        time.sleep(120)


@pytest.mark.timeout(90)
def test_killed_peer_is_a_transport_error_within_the_timeout(household: list[TestDevice]) -> None:
    context = multiprocessing.get_context("spawn")
    control, child_control = context.Pipe()
    worker = context.Process(
        target=_echo_worker, args=(household[1].tls, household[0].tls_name, child_control), daemon=True
    )
    worker.start()
    try:
        with GrpcPeerChannel(
            rank=0, world_size=2, job_id=JOB, tls=household[0].tls, authorize=lambda pem: True, config=CONFIG
        ) as channel:
            assert control.poll(60), "the worker did not start"
            channel.connect({1: (control.recv(), household[1].tls_name)})
            control.send(channel.address)
            ping = torch.randn(SPEC.shape, generator=torch.Generator().manual_seed(1))
            channel.send(1, _key("ping"), ping).wait(timeout=30)
            pong = channel.recv(1, _key("pong"), SPEC, timeout=30)
            assert torch.equal(pong, ping * 2)
            assert control.poll(30)
            assert control.recv() == "ready"

            worker.kill()
            worker.join(10)
            started = time.monotonic()
            with pytest.raises(TransportError, match="peer rank 1 ended its stream before sending more"):
                channel.recv(1, _key("more"), SPEC, timeout=30)
            assert time.monotonic() - started < 3
            started = time.monotonic()
            with pytest.raises(TransportError, match="peer rank 1"):
                channel.send(1, _key("after"), ping).wait(timeout=30)
            assert time.monotonic() - started < 3 + 1  # the channel's 3 s timeout, plus slack
    finally:
        if worker.is_alive():
            worker.kill()
        worker.join(10)
