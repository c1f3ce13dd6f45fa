"""Framing: header layout, frame reader errors, writer atomicity, envelope bytes."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from cocoon.protocol.gen.ttrpc import request_pb2
from cocoon.protocol.ttrpc import errors as E
from cocoon.protocol.ttrpc.framing import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Flags,
    Frame,
    FrameWriter,
    MessageType,
    decode_header,
    encode_frame,
    read_frame,
)
from cocoon.protocol.ttrpc.wire import decode_response, encode_error_response, encode_ok_response, encode_request


def reader_of(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_header_layout_is_big_endian_length_id_type_flags():
    frame = encode_frame(0x01020305, MessageType.DATA, Flags.REMOTE_CLOSED | Flags.NO_DATA, b"abc")
    assert frame == b"\x00\x00\x00\x03" + b"\x01\x02\x03\x05" + b"\x03" + b"\x05" + b"abc"
    assert decode_header(frame[:HEADER_SIZE]) == (3, 0x01020305, 3, 5)
    assert MAX_MESSAGE_SIZE == 4 * 1024 * 1024


def test_encode_refuses_oversized_payload():
    with pytest.raises(E.OversizedFrame):
        encode_frame(1, MessageType.REQUEST, 0, b"x" * (MAX_MESSAGE_SIZE + 1))
    assert len(encode_frame(1, MessageType.REQUEST, 0, b"x" * MAX_MESSAGE_SIZE)) == MAX_MESSAGE_SIZE + HEADER_SIZE


async def test_reads_consecutive_frames_then_connection_closed():
    data = encode_frame(1, 1, 0, b"one") + encode_frame(3, 3, 1, b"") + encode_frame(5, 2, 0, b"x" * 70000)
    reader = reader_of(data)
    assert await read_frame(reader) == Frame(1, 1, 0, b"one")
    assert await read_frame(reader) == Frame(3, 3, 1, b"")
    assert (await read_frame(reader)).payload == b"x" * 70000
    with pytest.raises(E.ConnectionClosed):
        await read_frame(reader)


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 2])
async def test_eof_inside_a_frame_is_truncated(cut):
    frame = encode_frame(1, 1, 0, b"hello")
    with pytest.raises(E.TruncatedFrame) as info:
        await read_frame(reader_of(frame[:cut]))
    assert isinstance(info.value, E.FrameError)


async def test_oversized_frame_is_discarded_and_the_next_frame_is_read():
    huge = MAX_MESSAGE_SIZE + 1
    header = (huge).to_bytes(4, "big") + (7).to_bytes(4, "big") + b"\x01\x00"
    reader = reader_of(header + b"\0" * huge + encode_frame(9, 1, 0, b"next"))
    with pytest.raises(E.OversizedFrame) as info:
        await read_frame(reader)
    assert info.value.stream_id == 7
    assert info.value.length == huge
    assert await read_frame(reader) == Frame(9, 1, 0, b"next")


async def test_oversized_frame_cut_short_is_truncated():
    header = (MAX_MESSAGE_SIZE + 10).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\x01\x00"
    with pytest.raises(E.TruncatedFrame):
        await read_frame(reader_of(header + b"\0" * 100))


async def test_unknown_type_is_consumed_and_reported():
    reader = reader_of(encode_frame(1, 0x42, 0, b"???") + encode_frame(3, 1, 0, b"ok"))
    with pytest.raises(E.UnknownMessageType) as info:
        await read_frame(reader)
    assert info.value.msg_type == 0x42
    assert await read_frame(reader) == Frame(3, 1, 0, b"ok")


async def test_connection_reset_reads_as_closed():
    reader = asyncio.StreamReader()
    reader.set_exception(ConnectionResetError(104, "reset"))
    with pytest.raises(E.ConnectionClosed):
        await read_frame(reader)


def test_request_envelope_matches_the_go_wire_format():
    # Field 1 service, 2 method, 3 payload, 4 timeout_nano (varint), 5 metadata {1 key, 2 value}.
    data = encode_request("svc", "m", b"x", timeout=1e-9, metadata={"k": ["a", "b"]})
    assert data == (b"\x0a\x03svc" b"\x12\x01m" b"\x1a\x01x" b"\x20\x01"
                    b"\x2a\x06\x0a\x01k\x12\x01a" b"\x2a\x06\x0a\x01k\x12\x01b")


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 20000, 3_000_000])
def test_ok_response_by_hand_parses_as_a_response(size):
    payload = bytes(random.Random(size).randrange(256) for _ in range(min(size, 1000))) * (size // 1000 + 1)
    payload = payload[:size]
    data = encode_ok_response(payload)
    parsed = request_pb2.Response.FromString(data)
    assert parsed.HasField("status") and parsed.status.code == 0
    assert parsed.payload == payload
    assert decode_response(data) == payload


def test_error_response_decodes_to_the_matching_rpc_error():
    with pytest.raises(E.NotFound) as info:
        decode_response(encode_error_response(E.Code.NOT_FOUND, "gone"), method="/s/m")
    assert info.value.status_message == "gone"
    assert info.value.context["method"] == "/s/m"
    with pytest.raises(E.RPCError) as unknown:
        decode_response(encode_error_response(99, "future code"))
    assert unknown.value.code == E.Code.UNKNOWN and unknown.value.raw_code == 99


def test_garbage_response_is_a_payload_error():
    with pytest.raises(E.PayloadError):
        decode_response(b"\xff\xff\xff")


async def test_concurrent_writers_never_interleave_or_reorder_frames():
    left, right = socket.socketpair()
    reader, raw_writer = await asyncio.open_connection(sock=left)
    peer_reader, peer_writer = await asyncio.open_connection(sock=right)
    writer = FrameWriter(raw_writer, high_water=64 << 10)
    rng = random.Random(7)
    sent: dict[int, bytes] = {}
    next_id = iter(range(1, 10**6, 2))

    async def sender() -> None:
        for _ in range(15):
            sid = next(next_id)  # allocated right before sending, like the client does
            sent[sid] = bytes([sid % 251]) * rng.choice([0, 1, 100, 5000, 200_000])
            await writer.send(sid, MessageType.DATA, 0, sent[sid])
            await asyncio.sleep(0)

    async def receive() -> list[Frame]:
        frames = []
        for _ in range(20 * 15):
            frames.append(await read_frame(peer_reader))
            if rng.random() < 0.3:
                await asyncio.sleep(0.001)  # a slow reader: the writers hit backpressure
        return frames

    receiving = asyncio.create_task(receive())
    await asyncio.gather(*(sender() for _ in range(20)))
    frames = await receiving
    # Whole, and in the order they were sent (ttrpc needs increasing stream ids on the wire).
    assert [f.stream_id for f in frames] == sorted(sent)
    assert all(f.payload == sent[f.stream_id] for f in frames)
    await writer.aclose()
    peer_writer.close()
    await peer_writer.wait_closed()
    del reader


async def test_writer_reports_a_closed_connection():
    left, right = socket.socketpair()
    _, raw_writer = await asyncio.open_connection(sock=left)
    writer = FrameWriter(raw_writer)
    await writer.aclose()
    right.close()
    with pytest.raises(E.ConnectionClosed):
        await writer.send(1, MessageType.REQUEST, 0, b"x")
