"""Wire <-> domain conversion for the tensor stream (protos/cetd/wire/tensor.proto), without extra copies.

A tensor travels as one frame holding its `TensorHeader` and its first chunk of raw bytes, then chunk
frames for the rest, so a tensor of at most one chunk costs a single gRPC message. Headers and the
stream opening are small and go through the generated protobuf classes; the bytes are the bulk and are
framed and unframed here by hand, byte for byte what protobuf writes for ``TensorFrame{header, chunk}``
and ``TensorFrame{chunk}``, so that a chunk costs one copy into the frame on the way out and one copy
into the receiver's preallocated buffer on the way in (a protobuf round trip would add two more).
Everything announced by a peer is validated before a byte of memory is allocated for it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cetd.ids import PROTOCOL_VERSION, JobId
from cetd.transport.channel import TensorKey, TensorMismatch, TensorSpec
from cetd.wire import tensor_pb2

ALLOWED_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
"""The dtypes a peer may announce, by wire name; anything else is refused."""

_HEADER_TAG = 0x12
"""Field 2 (``header``) of `TensorFrame`, wire type 2 (length-delimited)."""
_CHUNK_TAG = 0x1A
"""Field 3 (``chunk``) of `TensorFrame`, wire type 2 (length-delimited)."""
_NO_BYTES = memoryview(b"")


class FrameError(Exception):
    """A peer sent a frame that breaks the stream protocol; the receiver ends the stream with this text."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamOpening:
    """Who opened a tensor stream and for whom."""

    job_id: JobId
    sender_rank: int
    receiver_rank: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorAnnouncement:
    """A validated tensor header: what is coming and how many bytes it takes."""

    key: TensorKey
    dtype: torch.dtype
    shape: tuple[int, ...]
    total_bytes: int
    crc32: int | None
    """zlib CRC-32 of the tensor's bytes when the sender asked for a check, else None."""
    defer_ack: bool = False
    """The sender has more tensors queued behind this one and needs no acknowledgement of it alone."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderFrame:
    """A frame that announces a tensor, with the tensor's first bytes when the sender put them in it."""

    announcement: TensorAnnouncement
    first_chunk: memoryview
    """A view of the frame, empty when the header came alone."""


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a dtype, e.g. ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def describe_key(key: TensorKey) -> str:
    """A tensor key as people read it: ``"act step 3 mb 0"`` (per-step tensors omit the micro-batch)."""
    text = f"{key.name} step {key.step}"
    return text if key.micro_batch < 0 else f"{text} mb {key.micro_batch}"


def describe_layout(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    """A dtype and shape as people read them: ``"float32[8,32,64]"``."""
    return f"{dtype_name(dtype)}[{','.join(str(d) for d in shape)}]"


def check_spec(peer: int, key: TensorKey, tensor: torch.Tensor, spec: TensorSpec) -> None:
    """Raise `TensorMismatch` when a received tensor is not what the receiver expected."""
    shape = tuple(tensor.shape)
    if tensor.dtype != spec.dtype or shape != tuple(spec.shape):
        raise TensorMismatch(
            f"peer rank {peer} sent {describe_key(key)} as {describe_layout(tensor.dtype, shape)}, "
            f"expected {describe_layout(spec.dtype, tuple(spec.shape))}"
        )


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of a CPU tensor's storage; copies only when the tensor is not contiguous on CPU."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


def encode_open(opening: StreamOpening) -> bytes:
    """The first frame of a stream."""
    frame = tensor_pb2.TensorFrame(
        open=tensor_pb2.StreamOpen(
            protocol_version=PROTOCOL_VERSION,
            job_id=opening.job_id,
            sender_rank=opening.sender_rank,
            receiver_rank=opening.receiver_rank,
        )
    )
    return frame.SerializeToString()


def encode_header(
    key: TensorKey,
    tensor: torch.Tensor,
    data: memoryview,
    *,
    checksum: bool,
    defer_ack: bool = False,
    first_chunk: memoryview = _NO_BYTES,
) -> bytes:
    """The frame announcing ``tensor`` whose bytes are ``data``, carrying ``first_chunk`` (a prefix of them).

    Built with one copy of ``first_chunk``: the header goes through protobuf, the bytes are appended as
    the ``chunk`` field exactly as protobuf would write it.
    """
    header = tensor_pb2.TensorHeader(
        step=key.step,
        micro_batch=key.micro_batch,
        name=key.name,
        dtype=dtype_name(tensor.dtype),
        shape=list(tensor.shape),
        total_bytes=data.nbytes,
        defer_ack=defer_ack,
    )
    if checksum:
        header.checksum_kind = tensor_pb2.CHECKSUM_CRC32
        header.checksum = zlib.crc32(data)
    encoded = header.SerializeToString()
    parts: list[bytes | memoryview] = [bytes((_HEADER_TAG,)), _varint(len(encoded)), encoded]
    if first_chunk.nbytes:
        parts += [bytes((_CHUNK_TAG,)), _varint(first_chunk.nbytes), first_chunk]
    return b"".join(parts)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunks(data: memoryview, chunk_bytes: int) -> Iterator[bytes]:
    """Chunk frames carrying ``data``, each holding at most ``chunk_bytes`` bytes (none for empty data).

    Each frame is built with one copy of its slice; frames are produced lazily so that only the ones in
    flight exist at a time.
    """
    for start in range(0, data.nbytes, chunk_bytes):
        piece = data[start : start + chunk_bytes]
        yield b"".join((bytes((_CHUNK_TAG,)), _varint(piece.nbytes), piece))


def encode_tensor(
    key: TensorKey, tensor: torch.Tensor, data: memoryview, *, chunk_bytes: int, checksum: bool, defer_ack: bool
) -> Iterator[bytes]:
    """Every frame of one tensor: the header with the first ``chunk_bytes`` bytes, then chunk frames."""
    yield encode_header(key, tensor, data, checksum=checksum, defer_ack=defer_ack, first_chunk=data[:chunk_bytes])
    if data.nbytes > chunk_bytes:
        yield from encode_chunks(data[chunk_bytes:], chunk_bytes)


def _read_varint(frame: bytes, position: int) -> tuple[int, int] | None:
    """The varint at ``position`` and the position after it, or None when it is truncated or too long."""
    value = 0
    shift = 0
    end = min(len(frame), position + 10)
    while position < end:
        byte = frame[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position
    return None


def _chunk_payload(frame: bytes, position: int = 0) -> memoryview | None:
    """The payload of a lone chunk field filling ``frame`` from ``position``, or None when it is anything else."""
    if position >= len(frame) or frame[position] != _CHUNK_TAG:
        return None
    length = _read_varint(frame, position + 1)
    if length is None or length[1] + length[0] != len(frame):
        return None
    return memoryview(frame)[length[1] :]


def _split_header_frame(frame: bytes) -> tuple[bytes, memoryview] | None:
    """A header field's bytes and the lone chunk field after it, or None when the frame is laid out otherwise."""
    if not frame or frame[0] != _HEADER_TAG:
        return None
    length = _read_varint(frame, 1)
    if length is None:
        return None
    end = length[1] + length[0]
    if end == len(frame):
        return frame[length[1] :], _NO_BYTES
    chunk = _chunk_payload(frame, end)
    return None if chunk is None else (frame[length[1] : end], chunk)


def decode_frame(
    frame: bytes, *, max_tensor_bytes: int
) -> StreamOpening | HeaderFrame | memoryview:
    """Decode one frame: the stream opening, a validated tensor header (with its first bytes), or a chunk.

    Frames as `encode_header` and `encode_chunks` lay them out are split by hand, without copying the
    bytes they carry; anything else a protobuf encoder may write goes through protobuf.

    Raises:
        FrameError: the frame is malformed or announces a tensor the receiver refuses.
    """
    payload = _chunk_payload(frame)
    if payload is not None:
        return payload
    split = _split_header_frame(frame)
    try:
        if split is not None:
            header = tensor_pb2.TensorHeader.FromString(split[0])
            return HeaderFrame(
                announcement=validate_header(header, max_tensor_bytes=max_tensor_bytes), first_chunk=split[1]
            )
        message = tensor_pb2.TensorFrame.FromString(frame)
    except FrameError:
        raise
    except Exception as error:  # protobuf raises DecodeError or RuntimeError depending on the backend
        raise FrameError(f"malformed frame: {error}") from error
    kind = message.WhichOneof("frame")
    if kind is None:
        if message.chunk:
            return memoryview(message.chunk)
        raise FrameError("empty frame")
    if kind == "header":
        announcement = validate_header(message.header, max_tensor_bytes=max_tensor_bytes)
        return HeaderFrame(announcement=announcement, first_chunk=memoryview(message.chunk))
    if message.chunk:
        raise FrameError("StreamOpen carries tensor bytes")
    opening = message.open
    if opening.protocol_version != PROTOCOL_VERSION:
        raise FrameError(
            f"protocol version {opening.protocol_version} is not supported (this side speaks "
            f"{PROTOCOL_VERSION})"
        )
    return StreamOpening(
        job_id=JobId(opening.job_id), sender_rank=opening.sender_rank, receiver_rank=opening.receiver_rank
    )


def validate_header(header: tensor_pb2.TensorHeader, *, max_tensor_bytes: int) -> TensorAnnouncement:
    """Check a header before anything is allocated for it.

    Raises:
        FrameError: unknown dtype, size inconsistent with dtype and shape, or larger than allowed.
    """
    key = TensorKey(step=header.step, micro_batch=header.micro_batch, name=header.name)
    dtype = ALLOWED_DTYPES.get(header.dtype)
    if dtype is None:
        raise FrameError(f"{describe_key(key)} has dtype {header.dtype!r}, which is not allowed")
    shape = tuple(int(d) for d in header.shape)
    expected = math.prod(shape) * dtype.itemsize
    if header.total_bytes != expected:
        raise FrameError(
            f"{describe_key(key)} announces {header.total_bytes} bytes but "
            f"{describe_layout(dtype, shape)} takes {expected}"
        )
    if expected > max_tensor_bytes:
        raise FrameError(
            f"{describe_key(key)} announces {expected} bytes, more than the {max_tensor_bytes} allowed"
        )
    crc32 = header.checksum if header.checksum_kind == tensor_pb2.CHECKSUM_CRC32 else None
    return TensorAnnouncement(
        key=key, dtype=dtype, shape=shape, total_bytes=expected, crc32=crc32, defer_ack=header.defer_ack
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedTensor:
    """A complete tensor's bytes, not yet turned into a torch tensor.

    The torch calls that make the tensor release and retake the GIL, so they are left to the thread that
    claims it rather than made on the event loop that reads the stream.
    """

    announcement: TensorAnnouncement
    buffer: np.ndarray[tuple[int], np.dtype[np.uint8]]

    def tensor(self) -> torch.Tensor:
        """The tensor, a view of the received bytes (no copy)."""
        announcement = self.announcement
        if not announcement.total_bytes:  # numpy gives an empty array stride 0, which torch cannot view
            return torch.empty(announcement.shape, dtype=announcement.dtype)
        return torch.from_numpy(self.buffer).view(announcement.dtype).reshape(announcement.shape)


class TensorAssembler:
    """Receives one announced tensor's chunks into a single preallocated buffer."""

    def __init__(self, announcement: TensorAnnouncement) -> None:
        self.announcement = announcement
        # np.empty does not zero the memory (a bytearray would); the tensor is a view of it at the end.
        self._buffer: np.ndarray[tuple[int], np.dtype[np.uint8]] = np.empty(announcement.total_bytes, dtype=np.uint8)
        self._view = self._buffer.data.cast("B") if announcement.total_bytes else None
        self._filled = 0

    @property
    def complete(self) -> bool:
        """Whether every announced byte has arrived."""
        return self._filled == self.announcement.total_bytes

    def add(self, chunk: memoryview) -> None:
        """Copy one chunk's payload into place.

        Raises:
            FrameError: the chunk would overrun the announced size.
        """
        end = self._filled + chunk.nbytes
        if self._view is None or end > self.announcement.total_bytes:
            raise FrameError(
                f"{describe_key(self.announcement.key)} sent more than the announced "
                f"{self.announcement.total_bytes} bytes"
            )
        self._view[self._filled : end] = chunk
        self._filled = end

    def received(self) -> ReceivedTensor:
        """The complete tensor's bytes, once checked.

        Raises:
            FrameError: the checksum the sender announced does not match the bytes.
        """
        announcement = self.announcement
        if announcement.crc32 is not None:
            found = zlib.crc32(self._view) if self._view is not None else 0
            if found != announcement.crc32:
                raise FrameError(f"{describe_key(announcement.key)} failed its CRC-32 check")
        return ReceivedTensor(announcement=announcement, buffer=self._buffer)

    def tensor(self) -> torch.Tensor:
        """The received tensor, a view of the buffer (no copy).

        Raises:
            FrameError: the checksum the sender announced does not match the bytes.
        """
        return self.received().tensor()
