"""cetd.runtime.collectives over real GrpcPeerChannels: three ranks, mutual TLS, one process."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch

from cetd.ids import JobId
from cetd.runtime.collectives import RING_MIN_BYTES, all_reduce_
from cetd.transport.channel import TensorKey
from cetd.transport.tensor_channel import GrpcPeerChannel, TensorChannelConfig
from tests.transport.conftest import TestDevice

torch.set_num_threads(1)


@pytest.fixture
def trio(household: list[TestDevice]) -> Iterator[list[GrpcPeerChannel]]:
    config = TensorChannelConfig(timeout=timedelta(seconds=20))
    channels = [
        GrpcPeerChannel(rank=rank, world_size=3, job_id=JobId("job-collectives"), tls=device.tls,
                        authorize=lambda pem: True, config=config)
        for rank, device in enumerate(household)
    ]
    for channel in channels:
        channel.connect({
            other.rank: (other.address, household[other.rank].tls_name) for other in channels if other is not channel
        })
    yield channels
    for channel in channels:
        channel.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("numel", [7, RING_MIN_BYTES // 8 * 3 + 5], ids=["direct", "ring"])
def test_all_reduce_sums_bit_identically_on_every_rank(trio: list[GrpcPeerChannel], numel: int) -> None:
    inputs = [torch.randn(numel, dtype=torch.float64, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    tensors = [tensor.clone() for tensor in inputs]
    key = TensorKey(step=5, micro_batch=-1, name="grads")
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(all_reduce_, channel, tensor, ranks=[0, 1, 2], key=key, timeout=timedelta(seconds=20))
            for channel, tensor in zip(trio, tensors, strict=True)
        ]
        for future in futures:
            future.result(timeout=50)
    expected = inputs[0] + inputs[1] + inputs[2]
    assert torch.allclose(tensors[0], expected, rtol=0, atol=1e-12)
    assert torch.equal(tensors[0], tensors[1])
    assert torch.equal(tensors[0], tensors[2])
