"""Wire <-> domain conversion for the tensor stream (protos/cetd/wire/tensor.proto), without extra copies.

A tensor travels as one `TensorHeader` frame and then chunk frames of raw bytes. Headers and the stream
opening are small and go through the generated protobuf classes; chunk frames are the bulk and are
encoded and decoded here by hand, byte for byte what protobuf writes for ``TensorFrame{chunk}``, so
that a chunk costs one copy into the frame on the way out and one copy into the receiver's
preallocated buffer on the way in (a protobuf round trip would add two more). Everything announced by a
peer is validated before a byte of memory is allocated for it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cetd.ids import PROTOCOL_VERSION, JobId
from cetd.transport.channel import TensorKey, TensorSpec, TransportError
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

_CHUNK_TAG = 0x1A
"""Field 3 (``chunk``) of `TensorFrame`, wire type 2 (length-delimited)."""


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
    """Raise `TransportError` when a received tensor is not what the receiver expected."""
    shape = tuple(tensor.shape)
    if tensor.dtype != spec.dtype or shape != tuple(spec.shape):
        raise TransportError(
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


def encode_header(key: TensorKey, tensor: torch.Tensor, data: memoryview, *, checksum: bool) -> bytes:
    """The header frame announcing ``tensor`` whose bytes are ``data``."""
    header = tensor_pb2.TensorHeader(
        step=key.step,
        micro_batch=key.micro_batch,
        name=key.name,
        dtype=dtype_name(tensor.dtype),
        shape=list(tensor.shape),
        total_bytes=data.nbytes,
    )
    if checksum:
        header.checksum_kind = tensor_pb2.CHECKSUM_CRC32
        header.checksum = zlib.crc32(data)
    return tensor_pb2.TensorFrame(header=header).SerializeToString()


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


def _chunk_payload(frame: bytes) -> memoryview | None:
    """The payload of a frame encoded as a lone chunk field, or None when it is anything else."""
    if not frame or frame[0] != _CHUNK_TAG:
        return None
    length = 0
    shift = 0
    position = 1
    while position < len(frame) and position < 11:
        byte = frame[position]
        position += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return memoryview(frame)[position:] if position + length == len(frame) else None
    return None


def decode_frame(frame: bytes, *, max_tensor_bytes: int) -> StreamOpening | TensorAnnouncement | memoryview:
    """Decode one frame: the stream opening, a validated tensor header, or a chunk's payload.

    Raises:
        FrameError: the frame is malformed or announces a tensor the receiver refuses.
    """
    payload = _chunk_payload(frame)
    if payload is not None:
        return payload
    try:
        message = tensor_pb2.TensorFrame.FromString(frame)
    except Exception as error:  # protobuf raises DecodeError or RuntimeError depending on the backend
        raise FrameError(f"malformed frame: {error}") from error
    kind = message.WhichOneof("frame")
    if kind == "chunk":
        return memoryview(message.chunk)
    if kind == "open":
        opening = message.open
        if opening.protocol_version != PROTOCOL_VERSION:
            raise FrameError(
                f"protocol version {opening.protocol_version} is not supported (this side speaks "
                f"{PROTOCOL_VERSION})"
            )
        return StreamOpening(
            job_id=JobId(opening.job_id), sender_rank=opening.sender_rank, receiver_rank=opening.receiver_rank
        )
    if kind == "header":
        return validate_header(message.header, max_tensor_bytes=max_tensor_bytes)
    raise FrameError("empty frame")


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
    return TensorAnnouncement(key=key, dtype=dtype, shape=shape, total_bytes=expected, crc32=crc32)


class TensorAssembler:
    """Receives one announced tensor's chunks into a single preallocated buffer."""

    def __init__(self, announcement: TensorAnnouncement) -> None:
        self.announcement = announcement
        # torch.empty does not zero the memory (a bytearray would); the tensor is a view of it at the end.
        self._buffer = torch.empty(announcement.total_bytes, dtype=torch.uint8)
        self._view = self._buffer.numpy().data.cast("B") if announcement.total_bytes else None
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

    def tensor(self) -> torch.Tensor:
        """The received tensor, a view of the buffer (no copy).

        Raises:
            FrameError: the checksum the sender announced does not match the bytes.
        """
        announcement = self.announcement
        if announcement.crc32 is not None:
            found = zlib.crc32(self._view) if self._view is not None else 0
            if found != announcement.crc32:
                raise FrameError(f"{describe_key(announcement.key)} failed its CRC-32 check")
        return self._buffer.view(announcement.dtype).reshape(announcement.shape)
