"""Hostile peers: bad frames get a clear answer or a closed connection, never a crashed or stuck server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random

import pytest
from ttrpc_helpers import SERVICE, EchoReply, EchoRequest, fd_count

from cocoon.protocol import ttrpc
from cocoon.protocol.gen.ttrpc import request_pb2
from cocoon.protocol.ttrpc.framing import MAX_MESSAGE_SIZE, encode_frame, read_frame
from cocoon.protocol.ttrpc.wire import encode_request

REQUEST, RESPONSE, DATA = 1, 2, 3


def good_request(text: str = "ok") -> bytes:
    return encode_request(SERVICE, "Unary", EchoRequest(text=text).SerializeToString())


async def status_of(reader: asyncio.StreamReader, stream_id: int) -> tuple[int, str]:
    frame = await asyncio.wait_for(read_frame(reader), 5)
    assert frame.stream_id == stream_id and frame.msg_type == RESPONSE
    response = request_pb2.Response.FromString(frame.payload)
    return response.status.code, response.status.message


@pytest.fixture
async def raw(echo):
    """Opens raw connections to the echo server; closes them after the test."""
    opened = []

    async def connect():
        reader, writer = await asyncio.open_unix_connection(echo[2])
        opened.append(writer)
        return reader, writer

    yield connect
    for writer in opened:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_each_bad_frame_gets_an_answer_and_the_connection_keeps_working(raw):
    reader, writer = await raw()
    # even stream id
    writer.write(encode_frame(2, REQUEST, 0, good_request()))
    assert (await status_of(reader, 2))[0] == ttrpc.Code.INVALID_ARGUMENT
    # unknown message type
    writer.write(encode_frame(1, 0x09, 0, b"whatever"))
    code, message = await status_of(reader, 1)
    assert code == ttrpc.Code.INVALID_ARGUMENT and "unknown message type" in message
    # an envelope that is not a ttrpc.Request
    writer.write(encode_frame(3, REQUEST, 0, b"\xff\xff\xff\xff"))
    code, message = await status_of(reader, 3)
    assert code == ttrpc.Code.INVALID_ARGUMENT and "unmarshal request" in message
    # a payload that is not an EchoRequest
    bad_payload = encode_request(SERVICE, "Unary", b"\x0a\x05ab")
    writer.write(encode_frame(5, REQUEST, 0, bad_payload))
    assert (await status_of(reader, 5))[0] == ttrpc.Code.INVALID_ARGUMENT
    # oversized: discarded, answered RESOURCE_EXHAUSTED like the Go server
    size = MAX_MESSAGE_SIZE + 1
    writer.write(size.to_bytes(4, "big") + (7).to_bytes(4, "big") + bytes([REQUEST, 0]) + b"\0" * size)
    code, message = await status_of(reader, 7)
    assert code == ttrpc.Code.RESOURCE_EXHAUSTED and "exceed maximum message size" in message
    # a reused stream id
    writer.write(encode_frame(5, REQUEST, 0, good_request()))
    assert (await status_of(reader, 5))[0] == ttrpc.Code.INVALID_ARGUMENT
    # data for a stream that is not active
    writer.write(encode_frame(99, DATA, 0, b"x"))
    assert (await status_of(reader, 99))[0] == ttrpc.Code.INVALID_ARGUMENT
    # a response frame from the client
    writer.write(encode_frame(101, RESPONSE, 0, b""))
    assert (await status_of(reader, 101))[0] == ttrpc.Code.INVALID_ARGUMENT
    # and a good request on the same connection is served
    writer.write(encode_frame(103, REQUEST, 0, good_request("still here")))
    frame = await asyncio.wait_for(read_frame(reader), 5)
    assert frame.stream_id == 103
    assert EchoReply.FromString(request_pb2.Response.FromString(frame.payload).payload).text == "still here"


async def test_half_a_frame_then_close_drops_the_connection(echo, raw):
    server = echo[0]
    _reader, writer = await raw()
    frame = encode_frame(1, REQUEST, 0, good_request())
    writer.write(frame[: len(frame) // 2])
    await writer.drain()
    writer.close()
    for _ in range(200):
        if server.connection_count == 0:
            break
        await asyncio.sleep(0.005)
    assert server.connection_count == 0


async def test_a_silent_peer_does_not_hold_up_others(echo, raw):
    _, silent = await raw()
    silent.write(b"\x00\x00")  # two bytes of a header, then nothing
    async with await ttrpc.connect_unix(echo[2]) as client:
        reply = await asyncio.wait_for(client.call(SERVICE, "Unary", EchoRequest(text="x"), EchoReply), 2)
    assert reply.text == "x"


async def _garbage(path, kind: str, seed: int) -> None:
    rng = random.Random(seed)
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        if kind == "random":
            writer.write(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5000))))
        elif kind == "oversized":
            writer.write((MAX_MESSAGE_SIZE + 5).to_bytes(4, "big") + b"\0\0\0\x01\x01\0" + b"\0" * 1000)
        elif kind == "parity":
            for sid in range(2, 40, 2):
                writer.write(encode_frame(sid, REQUEST, 0, good_request()))
        elif kind == "unknown-type":
            for sid in range(1, 40, 2):
                writer.write(encode_frame(sid, rng.randrange(4, 256), rng.randrange(256), os.urandom(20)))
        elif kind == "half":
            writer.write(encode_frame(1, REQUEST, 0, good_request())[:13])
        elif kind == "slow-loris":
            for byte in encode_frame(1, REQUEST, 0, good_request())[:9]:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.001)
        await writer.drain()
    except OSError:
        pass  # the server may hang up first
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    del reader


async def test_garbage_from_many_connections_then_a_good_client_is_served(echo):
    server, _, path = echo
    await asyncio.sleep(0)
    fds = fd_count()
    tasks = asyncio.all_tasks()
    kinds = ["random", "oversized", "parity", "unknown-type", "half", "slow-loris"]
    await asyncio.gather(*(_garbage(path, kind, seed) for seed in range(3) for kind in kinds))
    async with await ttrpc.connect_unix(path) as client:
        replies = await asyncio.gather(
            *(client.call(SERVICE, "Unary", EchoRequest(text=str(i)), EchoReply, timeout=5) for i in range(8))
        )
    assert [r.text for r in replies] == [str(i) for i in range(8)]
    for _ in range(400):
        if server.connection_count == 0 and fd_count() == fds:
            break
        await asyncio.sleep(0.005)
    assert server.connection_count == 0
    assert fd_count() == fds, "server leaked file descriptors"
    assert asyncio.all_tasks() - tasks - {asyncio.current_task()} == set(), "server leaked tasks"
