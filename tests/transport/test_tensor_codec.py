"""Tests for cetd.transport.tensor_codec: frames are valid protobuf, headers are validated, no surprises."""

from __future__ import annotations

import zlib

import pytest
import torch

from cetd.transport.channel import TensorKey, TensorSpec, TransportError
from cetd.transport.tensor_codec import (
    FrameError,
    HeaderFrame,
    StreamOpening,
    TensorAssembler,
    check_spec,
    decode_frame,
    encode_chunks,
    encode_header,
    encode_open,
    encode_tensor,
    tensor_bytes,
    validate_header,
)
from cetd.wire import tensor_pb2

torch.set_num_threads(1)

KEY = TensorKey(step=3, micro_batch=0, name="act")
MIB = 1024 * 1024


def _bits(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _roundtrip(tensor: torch.Tensor, chunk_bytes: int, *, checksum: bool = False) -> torch.Tensor:
    data = tensor_bytes(tensor)
    frames = list(encode_tensor(KEY, tensor, data, chunk_bytes=chunk_bytes, checksum=checksum, defer_ack=False))
    assert len(frames) == max(1, -(-data.nbytes // chunk_bytes))  # the first chunk rides in the header frame
    header = decode_frame(frames[0], max_tensor_bytes=64 * MIB)
    assert isinstance(header, HeaderFrame)
    assembler = TensorAssembler(header.announcement)
    if header.first_chunk.nbytes:
        assembler.add(header.first_chunk)
    for frame in frames[1:]:
        payload = decode_frame(frame, max_tensor_bytes=64 * MIB)
        assert isinstance(payload, memoryview)
        assembler.add(payload)
    assert assembler.complete
    return assembler.tensor()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(3.5),
        torch.empty(0, 7),
        torch.arange(1000, dtype=torch.int64).reshape(10, 100),
        torch.randn(33, 17).to(torch.bfloat16),
        torch.randn(5, 5).to(torch.float16),
        torch.randn(4, 4, dtype=torch.float64),
        torch.rand(300) > 0.5,
        torch.randint(-128, 127, (1000,), dtype=torch.int8),
        torch.randn(64, 32).t(),  # not contiguous
    ],
    ids=["0d", "empty", "int64", "bf16", "f16", "f64", "bool", "int8", "transposed"],
)
def test_roundtrip_is_bit_exact(tensor: torch.Tensor) -> None:
    received = _roundtrip(tensor, chunk_bytes=1000)
    assert received.dtype == tensor.dtype
    assert received.shape == tensor.shape
    assert _bits(received) == _bits(tensor)


@pytest.mark.timeout(30)
def test_chunk_frames_are_what_protobuf_writes() -> None:
    data = memoryview(bytes(range(256)) * 1000)  # 256000 bytes: a 3-byte varint length
    frames = list(encode_chunks(data, 100_000))
    assert [len(tensor_pb2.TensorFrame.FromString(f).chunk) for f in frames] == [100_000, 100_000, 56_000]
    assert frames[0] == tensor_pb2.TensorFrame(chunk=bytes(data[:100_000])).SerializeToString()
    assert b"".join(tensor_pb2.TensorFrame.FromString(f).chunk for f in frames) == bytes(data)


@pytest.mark.timeout(30)
def test_tensor_within_one_chunk_is_one_frame_that_protobuf_reads_alike() -> None:
    tensor = torch.arange(300, dtype=torch.int16).reshape(3, 100)
    data = tensor_bytes(tensor)
    frames = list(encode_tensor(KEY, tensor, data, chunk_bytes=600, checksum=True, defer_ack=True))
    assert len(frames) == 1
    expected = tensor_pb2.TensorFrame(
        header=tensor_pb2.TensorHeader(
            step=3, micro_batch=0, name="act", dtype="int16", shape=[3, 100], total_bytes=600,
            checksum_kind=tensor_pb2.CHECKSUM_CRC32, checksum=zlib.crc32(data), defer_ack=True,
        ),
        chunk=bytes(data),
    )
    assert frames[0] == expected.SerializeToString()
    decoded = decode_frame(frames[0], max_tensor_bytes=MIB)
    assert isinstance(decoded, HeaderFrame)
    assert decoded.announcement.defer_ack
    assert decoded.announcement.crc32 == zlib.crc32(data)
    assert decoded.first_chunk.obj is frames[0]  # a view of the frame, not a copy
    assert bytes(decoded.first_chunk) == bytes(data)
    assembler = TensorAssembler(decoded.announcement)
    assembler.add(decoded.first_chunk)
    assert assembler.complete
    assert torch.equal(assembler.tensor(), tensor)


@pytest.mark.timeout(30)
def test_header_frames_laid_out_otherwise_go_through_protobuf() -> None:
    tensor = torch.arange(4, dtype=torch.uint8)
    data = tensor_bytes(tensor)
    alone = decode_frame(encode_header(KEY, tensor, data, checksum=False), max_tensor_bytes=MIB)
    assert isinstance(alone, HeaderFrame)
    assert (alone.first_chunk.nbytes, alone.announcement.total_bytes, alone.announcement.defer_ack) == (0, 4, False)
    # The chunk field before the header: valid protobuf that the hand-split path does not take.
    header = tensor_pb2.TensorFrame(header=tensor_pb2.TensorHeader(
        step=3, name="act", dtype="uint8", shape=[4], total_bytes=4)).SerializeToString()
    reordered = tensor_pb2.TensorFrame(chunk=b"\x00\x01").SerializeToString() + header
    decoded = decode_frame(reordered, max_tensor_bytes=MIB)
    assert isinstance(decoded, HeaderFrame)
    assert bytes(decoded.first_chunk) == b"\x00\x01"
    opening = StreamOpening(job_id="j", sender_rank=0, receiver_rank=1)  # type: ignore[arg-type]  # str for JobId
    open_with_bytes = encode_open(opening) + tensor_pb2.TensorFrame(chunk=b"x").SerializeToString()
    with pytest.raises(FrameError, match="StreamOpen carries tensor bytes"):
        decode_frame(open_with_bytes, max_tensor_bytes=MIB)
    with pytest.raises(FrameError, match="empty frame"):
        decode_frame(b"", max_tensor_bytes=MIB)
    with pytest.raises(FrameError, match="malformed frame"):
        decode_frame(b"\x12\x05ab", max_tensor_bytes=MIB)


@pytest.mark.timeout(30)
def test_chunk_with_extra_fields_falls_back_to_protobuf() -> None:
    # A chunk field written twice is still a valid TensorFrame; protobuf keeps the last one.
    frame = tensor_pb2.TensorFrame(chunk=b"ab").SerializeToString() * 2
    decoded = decode_frame(frame, max_tensor_bytes=MIB)
    assert isinstance(decoded, memoryview)
    assert bytes(decoded) == b"ab"


@pytest.mark.timeout(30)
def test_open_frame_roundtrip() -> None:
    opening = StreamOpening(job_id="job-1", sender_rank=2, receiver_rank=0)  # type: ignore[arg-type]  # str for JobId
    assert decode_frame(encode_open(opening), max_tensor_bytes=MIB) == opening


def _header(**fields: object) -> tensor_pb2.TensorHeader:
    base: dict[str, object] = {"step": 3, "micro_batch": 0, "name": "act", "dtype": "float32",
                               "shape": [8, 32, 64], "total_bytes": 8 * 32 * 64 * 4}
    base.update(fields)
    return tensor_pb2.TensorHeader(**base)  # type: ignore[arg-type]  # keyword fields of a generated message


@pytest.mark.timeout(30)
def test_header_validation() -> None:
    ok = validate_header(_header(), max_tensor_bytes=MIB)
    assert (ok.dtype, ok.shape, ok.total_bytes, ok.crc32) == (torch.float32, (8, 32, 64), 65536, None)
    with pytest.raises(FrameError, match="announces 65535 bytes but float32\\[8,32,64\\] takes 65536"):
        validate_header(_header(total_bytes=65535), max_tensor_bytes=MIB)
    with pytest.raises(FrameError, match="dtype 'complex64', which is not allowed"):
        validate_header(_header(dtype="complex64"), max_tensor_bytes=MIB)
    with pytest.raises(FrameError, match="announces 65536 bytes, more than the 65535 allowed"):
        validate_header(_header(), max_tensor_bytes=65535)


@pytest.mark.timeout(30)
def test_assembler_refuses_overrun_and_bad_checksum() -> None:
    tensor = torch.arange(10, dtype=torch.int32)
    data = tensor_bytes(tensor)
    header = decode_frame(encode_header(KEY, tensor, data, checksum=True), max_tensor_bytes=MIB)
    assert isinstance(header, HeaderFrame)
    assembler = TensorAssembler(header.announcement)
    assembler.add(memoryview(b"\x00" * 40))  # right size, wrong bytes
    with pytest.raises(FrameError, match="failed its CRC-32 check"):
        assembler.tensor()
    with pytest.raises(FrameError, match="more than the announced 40 bytes"):
        assembler.add(memoryview(b"\x00"))
    assert torch.equal(_roundtrip(tensor, 7, checksum=True), tensor)


@pytest.mark.timeout(30)
def test_check_spec_message() -> None:
    tensor = torch.zeros(8, 32, 64)
    check_spec(1, KEY, tensor, TensorSpec(dtype=torch.float32, shape=(8, 32, 64)))
    with pytest.raises(TransportError) as error:
        check_spec(1, KEY, tensor, TensorSpec(dtype=torch.float32, shape=(8, 32, 128)))
    assert str(error.value) == "peer rank 1 sent act step 3 mb 0 as float32[8,32,64], expected float32[8,32,128]"
    with pytest.raises(TransportError, match="grad step 2 as float32\\[8,32,64\\], expected bfloat16"):
        check_spec(1, TensorKey(step=2, micro_batch=-1, name="grad"), tensor,
                   TensorSpec(dtype=torch.bfloat16, shape=(8, 32, 64)))


@pytest.mark.timeout(30)
def test_tensor_bytes_shares_storage_when_contiguous() -> None:
    tensor = torch.arange(6, dtype=torch.float32)
    view = tensor_bytes(tensor)
    tensor[0] = 42.0
    assert bytes(view[:4]) == torch.tensor([42.0]).numpy().tobytes()
