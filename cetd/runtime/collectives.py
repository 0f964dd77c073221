"""Collective operations (all-reduce, all-gather, broadcast) over a `PeerChannel`.

Every result is deterministic and bit-identical on all participating ranks, because training on
several devices must not let replicas drift apart by a last bit per step:

* small tensors are exchanged whole and every rank folds them in the order of ``ranks``
  (``((x[r0] + x[r1]) + x[r2]) + ...``), the same operations in the same order everywhere;
* large tensors go round a ring (reduce-scatter, then all-gather): bandwidth-optimal, each rank sends
  ``2 (n-1)/n`` of the tensor. Segment ``c`` is folded starting at ``ranks[c]`` and continuing round the
  ring; its owner's result is then copied to everyone, so all ranks still hold identical bits.

For two ranks both paths compute exactly ``x[r0] + x[r1]`` (IEEE addition of two operands is
commutative). Sums are taken in the tensor's own dtype.

Every call takes a `TensorKey` that the caller makes unique per call (e.g. by step and a name); the
point-to-point messages of the call use keys derived from it, so concurrent calls never mix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import timedelta

import torch

from cetd.runtime.spec import DEFAULT_RING_MIN_BYTES
from cetd.transport.channel import PeerChannel, SendHandle, TensorKey, TensorSpec

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "RING_MIN_BYTES",
    "all_gather",
    "all_reduce_",
    "all_reduce_coalesced_",
    "broadcast_",
    "broadcast_coalesced_",
    "plan_buckets",
]

DEFAULT_BUCKET_BYTES = 4 * 2**20
"""Flattened gradients are reduced in buffers of about this size: few messages, bounded extra memory."""

RING_MIN_BYTES = DEFAULT_RING_MIN_BYTES
"""Tensors at least this large use the ring; smaller ones are exchanged whole (fewer round trips)."""


def all_reduce_(
    channel: PeerChannel,
    tensor: torch.Tensor,
    *,
    ranks: Sequence[int],
    key: TensorKey,
    timeout: timedelta | None = None,
    ring_min_bytes: int = RING_MIN_BYTES,
) -> torch.Tensor:
    """Replace ``tensor`` on every rank in ``ranks`` with the element-wise sum over those ranks.

    Every rank in ``ranks`` must call this with a tensor of the same shape and dtype, the same key and
    the same ``ring_min_bytes`` (the size from which the ring is used).

    Returns:
        ``tensor``, now holding the sum (bit-identical on every rank).

    Raises:
        ValueError: ``ranks`` has duplicates or does not contain this rank.
        TransportError: a peer sent another shape or dtype, failed, or timed out.
    """
    position = _position(channel, ranks)
    if len(ranks) == 1:
        return tensor
    flat = tensor.detach().reshape(-1)
    # reshape() copies a non-contiguous tensor; then the result is copied back at the end.
    shares_storage = tensor.is_contiguous()
    if flat.numel() * flat.element_size() >= ring_min_bytes and flat.numel() >= len(ranks):
        _ring_all_reduce(channel, flat, ranks, position, key, timeout)
    else:
        _direct_all_reduce(channel, flat, ranks, position, key, timeout)
    if not shares_storage:
        with torch.no_grad():
            tensor.copy_(flat.view(tensor.shape))
    return tensor


def all_gather(
    channel: PeerChannel,
    tensor: torch.Tensor,
    *,
    ranks: Sequence[int],
    key: TensorKey,
    timeout: timedelta | None = None,
) -> list[torch.Tensor]:
    """Collect every rank's ``tensor`` (same shape and dtype on all ranks).

    Returns:
        One tensor per entry of ``ranks``, in that order; this rank's entry is a copy of ``tensor``.
    """
    position = _position(channel, ranks)
    local = tensor.detach().clone()
    handles = [channel.send(peer, _sub_key(key, "gather"), local) for peer in ranks if peer != channel.rank]
    spec = TensorSpec(dtype=local.dtype, shape=tuple(local.shape))
    gathered = [
        local if index == position else channel.recv(peer, _sub_key(key, "gather"), spec, _seconds(timeout))
        for index, peer in enumerate(ranks)
    ]
    _wait_all(handles, timeout)
    return gathered


def broadcast_(
    channel: PeerChannel,
    tensor: torch.Tensor,
    *,
    root: int,
    ranks: Sequence[int],
    key: TensorKey,
    timeout: timedelta | None = None,
) -> torch.Tensor:
    """Copy ``root``'s ``tensor`` into ``tensor`` on every other rank in ``ranks``.

    Returns:
        ``tensor``, now equal to root's on every rank.
    """
    _position(channel, ranks)
    if root not in ranks:
        raise ValueError(f"broadcast root {root} is not one of the ranks {list(ranks)}")
    if channel.rank == root:
        payload = tensor.detach()
        handles = [channel.send(peer, _sub_key(key, "bcast"), payload) for peer in ranks if peer != root]
        _wait_all(handles, timeout)
        return tensor
    spec = TensorSpec(dtype=tensor.dtype, shape=tuple(tensor.shape))
    received = channel.recv(root, _sub_key(key, "bcast"), spec, _seconds(timeout))
    with torch.no_grad():
        tensor.copy_(received)
    return tensor


def plan_buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[int]]:
    """Group tensor indices into buckets of one dtype and at most ``bucket_bytes`` (or one larger tensor).

    The plan depends only on the tensors' order, dtypes and sizes, so ranks holding tensors of the same
    shapes agree on it without talking.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, not {bucket_bytes}")
    open_buckets: dict[torch.dtype, tuple[list[int], int]] = {}
    buckets: list[list[int]] = []
    for index, tensor in enumerate(tensors):
        size = tensor.numel() * tensor.element_size()
        members, used = open_buckets.get(tensor.dtype, ([], 0))
        if members and used + size > bucket_bytes:
            buckets.append(members)
            members, used = [], 0
        open_buckets[tensor.dtype] = ([*members, index], used + size)
    buckets.extend(members for members, _ in open_buckets.values())
    return sorted(buckets, key=lambda bucket: bucket[0])


def all_reduce_coalesced_(
    channel: PeerChannel,
    tensors: Sequence[torch.Tensor],
    *,
    ranks: Sequence[int],
    key: TensorKey,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    timeout: timedelta | None = None,
) -> Sequence[torch.Tensor]:
    """Sum many tensors (e.g. all gradients of a model) across ``ranks`` in place, a few buffers at a time.

    Returns:
        ``tensors``, each now holding its sum.
    """
    _position(channel, ranks)
    if len(ranks) == 1:
        return tensors
    for number, bucket in enumerate(plan_buckets(tensors, bucket_bytes)):
        members = [tensors[index] for index in bucket]
        flat = _flatten(members)
        all_reduce_(channel, flat, ranks=ranks, key=_sub_key(key, f"b{number}"), timeout=timeout)
        _unflatten_into(flat, members)
    return tensors


def broadcast_coalesced_(
    channel: PeerChannel,
    tensors: Sequence[torch.Tensor],
    *,
    root: int,
    ranks: Sequence[int],
    key: TensorKey,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    timeout: timedelta | None = None,
) -> Sequence[torch.Tensor]:
    """Copy root's ``tensors`` (e.g. initial parameters) to every rank in ``ranks``, bucketed.

    Returns:
        ``tensors``, each now equal to root's.
    """
    _position(channel, ranks)
    if len(ranks) == 1:
        return tensors
    for number, bucket in enumerate(plan_buckets(tensors, bucket_bytes)):
        members = [tensors[index] for index in bucket]
        flat = _flatten(members)
        broadcast_(channel, flat, root=root, ranks=ranks, key=_sub_key(key, f"b{number}"), timeout=timeout)
        if channel.rank != root:
            _unflatten_into(flat, members)
    return tensors


def _direct_all_reduce(
    channel: PeerChannel,
    flat: torch.Tensor,
    ranks: Sequence[int],
    position: int,
    key: TensorKey,
    timeout: timedelta | None,
) -> None:
    direct_key = _sub_key(key, "direct")
    handles = [channel.send(peer, direct_key, flat) for peer in ranks if peer != channel.rank]
    spec = TensorSpec(dtype=flat.dtype, shape=tuple(flat.shape))
    parts = [
        flat if index == position else channel.recv(peer, direct_key, spec, _seconds(timeout))
        for index, peer in enumerate(ranks)
    ]
    total = parts[0].clone()
    for part in parts[1:]:
        total.add_(part)
    # The transport may still read ``flat``; overwrite it only once every send has completed.
    _wait_all(handles, timeout)
    flat.copy_(total)


def _ring_all_reduce(
    channel: PeerChannel,
    flat: torch.Tensor,
    ranks: Sequence[int],
    position: int,
    key: TensorKey,
    timeout: timedelta | None,
) -> None:
    count = len(ranks)
    segments = list(torch.tensor_split(flat, count))
    next_peer = ranks[(position + 1) % count]
    previous_peer = ranks[(position - 1) % count]
    # Reduce-scatter: in round s this rank passes on its partial sum of segment (position - s) and adds
    # its own values to the partial of segment (position - s - 1); after count-1 rounds it holds the
    # complete sum of segment (position + 1).
    for round_number in range(count - 1):
        outgoing = segments[(position - round_number) % count]
        incoming = segments[(position - round_number - 1) % count]
        round_key = _sub_key(key, f"rs{round_number}")
        handle = channel.send(next_peer, round_key, outgoing)
        spec = TensorSpec(dtype=flat.dtype, shape=tuple(incoming.shape))
        partial = channel.recv(previous_peer, round_key, spec, _seconds(timeout))
        incoming.add_(partial)
        handle.wait(_seconds(timeout))
    # All-gather: pass the completed segments round the ring, overwriting the local partial sums.
    for round_number in range(count - 1):
        outgoing = segments[(position + 1 - round_number) % count]
        incoming = segments[(position - round_number) % count]
        round_key = _sub_key(key, f"ag{round_number}")
        handle = channel.send(next_peer, round_key, outgoing)
        spec = TensorSpec(dtype=flat.dtype, shape=tuple(incoming.shape))
        complete = channel.recv(previous_peer, round_key, spec, _seconds(timeout))
        handle.wait(_seconds(timeout))
        incoming.copy_(complete)


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensor.detach().reshape(-1) for tensor in tensors])


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            count = tensor.numel()
            tensor.copy_(flat[offset : offset + count].view(tensor.shape))
            offset += count


def _position(channel: PeerChannel, ranks: Sequence[int]) -> int:
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks {list(ranks)} contain duplicates")
    if channel.rank not in ranks:
        raise ValueError(f"rank {channel.rank} is not one of the collective's ranks {list(ranks)}")
    return list(ranks).index(channel.rank)


def _sub_key(key: TensorKey, suffix: str) -> TensorKey:
    return dataclasses.replace(key, name=f"{key.name}/{suffix}")


def _seconds(timeout: timedelta | None) -> float | None:
    return None if timeout is None else timeout.total_seconds()


def _wait_all(handles: Sequence[SendHandle], timeout: timedelta | None) -> None:
    for handle in handles:
        handle.wait(_seconds(timeout))
