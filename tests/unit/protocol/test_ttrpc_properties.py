"""Property tests of the frame reader: round trips in any chunking; byte soup never escapes the error tree."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cocoon.protocol.gen.ttrpc import request_pb2
from cocoon.protocol.ttrpc import errors as E
from cocoon.protocol.ttrpc.framing import HEADER_SIZE, Frame, encode_frame, read_frame
from cocoon.protocol.ttrpc.wire import decode_request, decode_response, encode_ok_response, encode_request

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

frames = st.lists(
    st.builds(
        Frame,
        stream_id=st.integers(0, 2**32 - 1),
        msg_type=st.sampled_from([1, 2, 3]),
        flags=st.integers(0, 255),
        payload=st.binary(max_size=3000),
    ),
    max_size=12,
)


async def _read_all(chunks: list[bytes]) -> tuple[list[Frame], E.ProtocolError]:
    """Feed chunks (yielding between them, as a socket would) and read until the reader gives up."""
    reader = asyncio.StreamReader()

    async def feed() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    got: list[Frame] = []
    total = sum(map(len, chunks))
    try:
        # Every frame consumes at least a header, so this bounds the loop: it cannot spin.
        for _ in range(total // HEADER_SIZE + 2):
            try:
                got.append(await read_frame(reader))
            except (E.OversizedFrame, E.UnknownMessageType):
                continue  # recoverable: the frame was consumed
            except E.ProtocolError as exc:
                return got, exc
        raise AssertionError("reader did not stop at the end of input")
    finally:
        await feeder


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@SETTINGS
@given(frames=frames, cuts=st.lists(st.integers(0, 10**6), max_size=20))
def test_frames_round_trip_in_any_chunking(frames, cuts):
    data = b"".join(encode_frame(f.stream_id, f.msg_type, f.flags, f.payload) for f in frames)
    got, end = asyncio.run(_read_all(_split(data, cuts)))
    assert got == frames
    assert type(end) is E.ConnectionClosed


@SETTINGS
@given(soup=st.binary(max_size=4000), cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_byte_soup_only_raises_protocol_errors_and_terminates(soup, cuts):
    got, end = asyncio.run(_read_all(_split(soup, cuts)))
    assert isinstance(end, E.ConnectionClosed | E.TruncatedFrame)
    assert sum(HEADER_SIZE + len(f.payload) for f in got) <= len(soup)


@SETTINGS
@given(prefix=frames, soup=st.binary(min_size=1, max_size=200))
def test_valid_frames_before_garbage_are_all_delivered(prefix, soup):
    data = b"".join(encode_frame(f.stream_id, f.msg_type, f.flags, f.payload) for f in prefix)
    got, _ = asyncio.run(_read_all([data, soup]))
    assert got[: len(prefix)] == prefix


@settings(max_examples=300, deadline=None)
@given(soup=st.binary(max_size=300))
def test_envelope_decoders_only_raise_protocol_errors(soup):
    for decode in (decode_request, decode_response):
        with contextlib.suppress(E.ProtocolError):
            decode(soup)


@settings(max_examples=200, deadline=None)
@given(
    service=st.text(max_size=40),
    method=st.text(max_size=20),
    payload=st.binary(max_size=300),
    timeout=st.none() | st.floats(min_value=0, max_value=1e6),
)
def test_hand_encoded_request_is_what_protobuf_writes(service, method, payload, timeout):
    data = encode_request(service, method, payload, timeout)
    reference = request_pb2.Request(service=service, method=method, payload=payload)
    if timeout is not None:
        reference.timeout_nano = max(1, int(timeout * 1_000_000_000))
    assert data == reference.SerializeToString()


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=400))
def test_hand_read_response_agrees_with_protobuf(payload):
    data = encode_ok_response(payload)
    assert decode_response(data) == request_pb2.Response.FromString(data).payload == payload
