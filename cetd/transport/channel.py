"""The runtime's only view of the network: point-to-point tensor exchange between the workers of a job.

This module is the interface and imports no grpc, so the runtime (above transport) can use it without
ever touching grpc; `tensor_channel` implements `PeerChannel` over mutual-TLS gRPC streams and the
daemon's worker process hands one to the runtime. Calls are synchronous because torch
compute runs on the worker's main thread; implementations move bytes on their own threads so that a
`send` overlaps the next computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorKey:
    """Names one tensor of one job so that sender and receiver agree on what is being exchanged."""

    step: int
    """Optimizer step the tensor belongs to."""
    micro_batch: int
    """Micro-batch index within the step; -1 for tensors that are per step (gradients, reductions)."""
    name: str
    """What the tensor is, e.g. ``"act"``, ``"grad"``, ``"allreduce/3"``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSpec:
    """What the receiver expects; anything else is refused with a clear error."""

    dtype: torch.dtype
    shape: tuple[int, ...]


class SendHandle(Protocol):
    """Completion of a `PeerChannel.send`."""

    def wait(self, timeout: float | None = None) -> None:
        """Block until the tensor has been handed to the peer's transport; raise if that failed."""


class PeerChannel(Protocol):
    """Tensor exchange with the other workers of one job, addressed by rank.

    Why a protocol: the schedules, collectives and equivalence tests run unchanged over the real
    gRPC transport and over an in-process implementation used to test pure logic.
    """

    @property
    def rank(self) -> int:
        """This worker's rank in the job, 0..world_size-1."""

    @property
    def world_size(self) -> int:
        """Number of workers in the job."""

    def send(self, peer: int, key: TensorKey, tensor: torch.Tensor) -> SendHandle:
        """Queue ``tensor`` for ``peer``; the caller must not modify it until the handle completes."""

    def recv(self, peer: int, key: TensorKey, spec: TensorSpec, timeout: float | None = None) -> torch.Tensor:
        """Block until ``peer`` sent the tensor named ``key``; raise `TransportError` on a dtype or shape
        other than ``spec``, on a peer failure, or after ``timeout`` seconds."""


class TransportError(RuntimeError):
    """A peer sent something other than what was expected, failed, or did not answer in time."""

    def __init__(self, message: str, *, peer: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer
        """Rank of the peer whose failure or silence this is, when the transport knows it: a failed send
        names its receiver, a failed group names the rank that failed it. None when not known."""


class TensorMismatch(TransportError):
    """A peer sent a tensor of another dtype or shape than the receiver expects: a protocol violation
    (a bug, or two versions of cetd in one job), never a lost peer — retrying elsewhere will not help."""
