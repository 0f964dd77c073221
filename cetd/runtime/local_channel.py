"""An in-process `PeerChannel` for ranks that run as threads of one process.

It exists to test the pure logic of schedules, collectives and parallel runners without sockets: it
behaves like a wire (tensors are cloned on send, so the sender may reuse its buffer and the receiver
never aliases it), validates what arrives against the receiver's `TensorSpec`, and times out. A rank
whose thread fails marks the group failed, so its peers' pending `recv` calls raise at once instead of
waiting for their timeout, as they would when a real peer dies. The real channel is gRPC
(`cetd.transport`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar, cast

import torch

from cetd.transport.channel import TensorKey, TensorMismatch, TensorSpec, TransportError

__all__ = ["LocalPeerChannel", "make_local_channels", "run_on_local_ranks"]

T = TypeVar("T")


class _CompletedSend:
    """A send that completed when it was queued: the tensor was already cloned into the mailbox."""

    def wait(self, timeout: float | None = None) -> None:
        """Return at once; nothing can fail after the clone."""


@dataclass(slots=True)
class _Mailboxes:
    """State shared by the channels of one group: undelivered tensors and the group's failure."""

    world_size: int
    condition: threading.Condition = field(default_factory=threading.Condition)
    pending: dict[tuple[int, int, TensorKey], torch.Tensor] = field(default_factory=dict)
    failure: str | None = None
    failed_rank: int | None = None
    bytes_sent: list[int] = field(default_factory=list)


class LocalPeerChannel:
    """One rank's end of an in-process group; build a group with `make_local_channels`."""

    def __init__(self, mailboxes: _Mailboxes, rank: int) -> None:
        self._mailboxes = mailboxes
        self._rank = rank

    @property
    def rank(self) -> int:
        """This worker's rank in the group."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of ranks in the group."""
        return self._mailboxes.world_size

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this rank has sent so far (for communication-volume assertions)."""
        return self._mailboxes.bytes_sent[self._rank]

    def send(self, peer: int, key: TensorKey, tensor: torch.Tensor) -> _CompletedSend:
        """Clone ``tensor`` into ``peer``'s mailbox under ``key``.

        Raises:
            ValueError: ``peer`` is this rank or outside the group.
            TransportError: the group failed, or ``key`` was already sent to ``peer`` and not yet
                received (two tensors under one name: a key-naming bug in the caller).
        """
        self._check_peer(peer)
        copy = tensor.detach().clone(memory_format=torch.contiguous_format)
        slot = (self._rank, peer, key)
        with self._mailboxes.condition:
            self._raise_if_failed()
            if slot in self._mailboxes.pending:
                raise TransportError(f"rank {self._rank} sent {key} to rank {peer} twice before it was received")
            self._mailboxes.pending[slot] = copy
            self._mailboxes.bytes_sent[self._rank] += copy.numel() * copy.element_size()
            self._mailboxes.condition.notify_all()
        return _CompletedSend()

    def recv(self, peer: int, key: TensorKey, spec: TensorSpec, timeout: float | None = None) -> torch.Tensor:
        """Wait for the tensor ``peer`` sent under ``key`` and check it against ``spec``.

        Raises:
            TransportError: wrong dtype or shape, the group failed, or nothing came in ``timeout`` s.
        """
        self._check_peer(peer)
        slot = (peer, self._rank, key)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._mailboxes.condition:
            while slot not in self._mailboxes.pending:
                self._raise_if_failed()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransportError(
                        f"rank {self._rank} waited {timeout:.3g} s for {key} from rank {peer}; nothing came"
                    )
                self._mailboxes.condition.wait(remaining)
            tensor = self._mailboxes.pending.pop(slot)
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise TensorMismatch(
                f"rank {self._rank} expected {key} from rank {peer} as {spec.dtype} {list(spec.shape)}, "
                f"got {tensor.dtype} {list(tensor.shape)}"
            )
        return tensor

    def fail(self, reason: str) -> None:
        """Mark the whole group failed: every pending and later send/recv raises `TransportError`."""
        with self._mailboxes.condition:
            if self._mailboxes.failure is None:
                self._mailboxes.failure = f"rank {self._rank} failed: {reason}"
                self._mailboxes.failed_rank = self._rank
            self._mailboxes.condition.notify_all()

    def undelivered(self) -> list[tuple[int, int, TensorKey]]:
        """(src, dst, key) of every tensor sent in the group and not received yet; empty after clean runs."""
        with self._mailboxes.condition:
            return sorted(self._mailboxes.pending, key=repr)

    def _check_peer(self, peer: int) -> None:
        if peer == self._rank or not 0 <= peer < self.world_size:
            raise ValueError(f"rank {self._rank} cannot address peer {peer} in a group of {self.world_size}")

    def _raise_if_failed(self) -> None:
        if self._mailboxes.failure is not None:
            raise TransportError(self._mailboxes.failure, peer=self._mailboxes.failed_rank)


def make_local_channels(world: int) -> list[LocalPeerChannel]:
    """Build the channels of a ``world``-rank in-process group; index ``i`` is rank ``i``."""
    if world < 1:
        raise ValueError(f"a group needs at least one rank, not {world}")
    mailboxes = _Mailboxes(world_size=world, bytes_sent=[0] * world)
    return [LocalPeerChannel(mailboxes, rank) for rank in range(world)]


def run_on_local_ranks(
    world: int,
    body: Callable[[LocalPeerChannel], T],
    *,
    timeout: timedelta = timedelta(seconds=60),
    channels: Sequence[LocalPeerChannel] | None = None,
) -> list[T]:
    """Run ``body(channel)`` for every rank of a fresh (or the given) group on its own thread.

    A rank that raises fails the group, so its peers stop waiting; the first failure (lowest rank
    among the original errors, not the `TransportError`s it caused) is re-raised here.

    Returns:
        Each rank's return value, indexed by rank.

    Raises:
        TimeoutError: a rank did not finish within ``timeout``.
    """
    group = list(channels) if channels is not None else make_local_channels(world)
    results: list[T | None] = [None] * world
    errors: list[BaseException | None] = [None] * world

    def run(rank: int) -> None:
        try:
            results[rank] = body(group[rank])
        except BaseException as error:
            errors[rank] = error
            group[rank].fail(f"{type(error).__name__}: {error}")

    threads = [
        threading.Thread(target=run, args=(rank,), name=f"local-rank-{rank}", daemon=True) for rank in range(world)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout.total_seconds()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        group[0].fail("the test harness timed out")
        for thread in threads:
            thread.join(5.0)
        raise TimeoutError(f"local ranks did not finish within {timeout}")
    raised = [error for error in errors if error is not None]
    if raised:
        primary = [error for error in raised if not isinstance(error, TransportError)]
        raise (primary or raised)[0]
    return cast(list[T], results)  # every slot was filled: no rank raised
