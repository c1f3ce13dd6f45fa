"""Server and client over unix sockets: unary, concurrency, timeouts, cancellation, streams, errors."""

from __future__ import annotations

import asyncio
import math
import os
import stat
import time

import pytest
from ttrpc_helpers import ECHO, SERVICE, EchoImpl, EchoReply, EchoRequest

from cocoon import errors
from cocoon.protocol import ttrpc
from cocoon.protocol.ttrpc import MAX_MESSAGE_SIZE


async def test_unary_call_with_metadata_and_deadline(echo, client):
    _, impl, _ = echo
    reply = await client.call(SERVICE, "Unary", EchoRequest(text="hi"), EchoReply,
                              timeout=5, metadata={"trace": "t1", "k": ["a", "b"]})
    assert reply.text == "hi"
    assert impl.metadata[-1] == {"trace": ["t1"], "k": ["a", "b"]}
    assert 4 < impl.deadlines[-1] <= 5
    await client.call(SERVICE, "Unary", EchoRequest(text="x"), EchoReply)
    assert impl.deadlines[-1] is None
    await client.call(SERVICE, "Unary", EchoRequest(text="x"), EchoReply, timeout=math.inf)
    assert impl.deadlines[-1] is None


async def test_stub_takes_types_from_the_descriptor(echo, client):
    stub = ttrpc.Stub(client, ECHO, timeout=5)
    reply = await stub.Unary(EchoRequest(text="stub"))
    assert type(reply) is EchoReply and reply.text == "stub"
    with pytest.raises(AttributeError):
        stub.NoSuchMethod  # noqa: B018
    with pytest.raises(errors.NotFound):
        stub.method("NoSuchMethod")


async def test_stream_ids_are_odd_and_increasing(echo, client):
    _, impl, _ = echo
    for _ in range(4):
        await client.call(SERVICE, "Unary", EchoRequest(), EchoReply)
    assert impl.stream_ids == [1, 3, 5, 7]


async def test_32_concurrent_requests_on_one_connection(echo, client):
    _, impl, _ = echo
    # Later requests finish first, so answers come back out of order.
    requests = [EchoRequest(text=f"r{i}", delay=(32 - i) * 0.002) for i in range(32)]
    started = time.monotonic()
    replies = await asyncio.gather(*(client.call(SERVICE, "Unary", r, EchoReply) for r in requests))
    assert [r.text for r in replies] == [f"r{i}" for i in range(32)]
    assert time.monotonic() - started < 0.5  # concurrently: one after the other takes over 1 s
    assert sorted(impl.stream_ids) == list(range(1, 64, 2))
    assert not client._calls


async def test_timeout_raises_deadline_exceeded_and_server_cancels_handler(echo, client):
    _, impl, _ = echo
    started = time.monotonic()
    with pytest.raises(ttrpc.DeadlineExceeded) as info:
        await client.call(SERVICE, "Unary", EchoRequest(delay=10), EchoReply, timeout=0.05)
    assert time.monotonic() - started < 1
    assert info.value.context["method"] == f"/{SERVICE}/Unary"
    for _ in range(100):
        if impl.cancelled:
            break
        await asyncio.sleep(0.01)
    assert impl.cancelled == 1
    assert (await client.call(SERVICE, "Unary", EchoRequest(text="after"), EchoReply)).text == "after"


async def test_cancelling_a_call_leaves_the_client_usable(echo, client):
    call = asyncio.create_task(client.call(SERVICE, "Unary", EchoRequest(delay=0.2), EchoReply))
    await asyncio.sleep(0.02)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not client._calls
    assert (await client.call(SERVICE, "Unary", EchoRequest(text="ok"), EchoReply)).text == "ok"
    await asyncio.sleep(0.25)  # the abandoned answer arrives and is dropped
    assert (await client.call(SERVICE, "Unary", EchoRequest(text="ok2"), EchoReply)).text == "ok2"


async def test_server_streaming(echo, client):
    stream = await client.stream(SERVICE, "ServerStream", EchoReply, EchoRequest(text="s", count=5))
    got = [(m.text, m.index) async for m in stream]
    assert got == [("s", i) for i in range(5)]
    assert await stream.recv() is None
    assert not client._streams


async def test_server_streaming_error_midway(echo, client):
    stream = await client.stream(SERVICE, "ServerStream", EchoReply, EchoRequest(count=5, fail="NotFound"))
    assert (await stream.recv()).index == 0
    assert (await stream.recv()).index == 1
    with pytest.raises(ttrpc.NotFound):
        await stream.recv()


async def test_client_streaming(echo, client):
    stream = await client.stream(SERVICE, "ClientStream", EchoReply, client_streaming=True, server_streaming=False)
    for word in ("a", "b", "c"):
        await stream.send(EchoRequest(text=word))
    await stream.close_send()
    reply = await stream.recv()
    assert (reply.text, reply.index) == ("a+b+c", 3)
    assert await stream.recv() is None


async def test_bidi_streaming_through_a_stub(echo, client):
    stub = ttrpc.Stub(client, ECHO)
    async with await stub.Bidi() as stream:
        for word in ("x", "y"):
            await stream.send(EchoRequest(text=word))
            assert (await stream.recv()).text == word.upper()
        await stream.close_send()
        assert await stream.recv() is None


async def test_stream_deadline(echo, client):
    stream = await client.stream(SERVICE, "Bidi", EchoReply, client_streaming=True, timeout=0.05)
    with pytest.raises(ttrpc.DeadlineExceeded):
        await stream.recv()


@pytest.mark.parametrize(
    ("fail", "raised", "also"),
    [
        ("NotFound", ttrpc.NotFound, errors.NotFound),
        ("InvalidArgument", ttrpc.InvalidArgument, errors.InvalidArgument),
        ("StateError", ttrpc.FailedPrecondition, errors.StateError),
        ("AlreadyExists", ttrpc.AlreadyExists, errors.AlreadyExists),
        ("Cocoon", ttrpc.Unknown, ttrpc.RPCError),
        ("Value", ttrpc.Internal, ttrpc.RPCError),
        ("Timeout", ttrpc.DeadlineExceeded, ttrpc.RPCError),
        ("NotImplemented", ttrpc.Unimplemented, ttrpc.RPCError),
        ("Unavailable", ttrpc.Unavailable, ttrpc.RPCError),
    ],
)
async def test_handler_errors_keep_their_meaning_across_the_wire(echo, client, fail, raised, also):
    with pytest.raises(raised) as info:
        await client.call(SERVICE, "Unary", EchoRequest(fail=fail), EchoReply)
    err = info.value
    assert isinstance(err, also) and isinstance(err, ttrpc.ProtocolError)
    assert err.code == raised.CODE
    assert err.context["method"] == f"/{SERVICE}/Unary"
    if fail == "NotFound":
        assert err.status_message == "no such container (id=c1)"
    if fail == "Value":
        assert err.status_message == "ValueError: boom"


async def test_unknown_service_and_method_are_unimplemented(echo, client):
    with pytest.raises(ttrpc.Unimplemented, match=r"service nope\.Svc"):
        await client.call("nope.Svc", "M", EchoRequest(), EchoReply)
    with pytest.raises(ttrpc.Unimplemented, match="method Nope"):
        await client.call(SERVICE, "Nope", EchoRequest(), EchoReply)
    with pytest.raises(ttrpc.Unimplemented, match="not implemented"):  # in the descriptor, not in EchoImpl
        await client.call(SERVICE, "Missing", EchoRequest(), EchoReply)


async def test_handler_returning_nothing_is_internal(echo, client):
    server, _, _ = echo

    async def nothing(request, ctx):
        return None

    server.register("t.Svc", "Nothing", EchoRequest, nothing)
    with pytest.raises(ttrpc.Internal, match="NoneType"):
        await client.call("t.Svc", "Nothing", EchoRequest(), EchoReply)


async def test_response_too_large_for_a_frame_is_resource_exhausted(echo, client):
    with pytest.raises(ttrpc.ResourceExhausted):
        await client.call(SERVICE, "Unary", EchoRequest(blob=b"x" * (3 << 20), count=2), EchoReply)
    with pytest.raises(ttrpc.OversizedFrame):  # refused before it is sent
        await client.call(SERVICE, "Unary", EchoRequest(blob=b"x" * (MAX_MESSAGE_SIZE + 1)), EchoReply)
    big = b"y" * (2 << 20)
    assert (await client.call(SERVICE, "Unary", EchoRequest(blob=big), EchoReply)).blob == big


async def test_registration_rules(echo):
    server, impl, _ = echo
    with pytest.raises(errors.AlreadyExists):
        server.register(SERVICE, "Unary", EchoRequest, impl.Unary)

    def not_async(request, ctx):
        return None

    with pytest.raises(errors.InvalidArgument):
        server.register("t.Svc", "Sync", EchoRequest, not_async)  # type: ignore[arg-type]
    with pytest.raises(errors.NotFound):
        server.register_service("no.such.Service", impl)


async def test_server_close_fails_pending_calls(echo, client):
    server, _, _ = echo
    pending = asyncio.create_task(client.call(SERVICE, "Unary", EchoRequest(delay=5), EchoReply))
    await asyncio.sleep(0.02)
    await server.close()
    with pytest.raises(ttrpc.ConnectionClosed):
        await pending
    with pytest.raises(ttrpc.ConnectionClosed):
        await client.call(SERVICE, "Unary", EchoRequest(), EchoReply)
    assert client.closed


async def test_graceful_shutdown_lets_running_calls_finish(echo, client):
    server, _, path = echo
    slow = asyncio.create_task(client.call(SERVICE, "Unary", EchoRequest(text="slow", delay=0.1), EchoReply))
    await asyncio.sleep(0.02)
    await server.shutdown(grace=5)
    assert (await slow).text == "slow"
    assert server.connection_count == 0
    assert not path.exists()
    with pytest.raises(errors.StateError):
        await server.serve_unix(path)


async def test_client_close_cancels_server_handlers(echo):
    server, impl, path = echo
    c = await ttrpc.connect_unix(path)
    pending = asyncio.create_task(c.call(SERVICE, "Unary", EchoRequest(delay=5), EchoReply))
    await asyncio.sleep(0.02)
    await c.close()
    with pytest.raises(ttrpc.ConnectionClosed):
        await pending
    for _ in range(100):
        if impl.cancelled and server.connection_count == 0:
            break
        await asyncio.sleep(0.01)
    assert impl.cancelled == 1 and server.connection_count == 0


async def test_unix_socket_mode_stale_socket_and_live_socket(sock_dir, no_leaks):
    path = sock_dir / "s.sock"
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(path))
    stale.close()  # a socket file nobody listens on
    server = ttrpc.Server()
    server.register_service(ECHO, EchoImpl())
    await server.serve_unix(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    other = ttrpc.Server()
    with pytest.raises(errors.AlreadyExists):
        await other.serve_unix(path)
    await other.close()
    await server.close()
    assert not path.exists()


async def test_connect_to_nothing_is_unavailable(sock_dir):
    with pytest.raises(ttrpc.Unavailable):
        await ttrpc.connect_unix(sock_dir / "nobody.sock")


async def test_too_many_concurrent_requests_are_refused(sock_dir, no_leaks):
    server = ttrpc.Server(max_concurrent_requests=4)
    server.register_service(ECHO, EchoImpl())
    await server.serve_unix(sock_dir / "s.sock")
    async with await ttrpc.connect_unix(sock_dir / "s.sock") as c:
        results = await asyncio.gather(
            *(c.call(SERVICE, "Unary", EchoRequest(delay=0.05), EchoReply) for _ in range(6)),
            return_exceptions=True,
        )
    refused = [r for r in results if isinstance(r, ttrpc.ResourceExhausted)]
    assert len(refused) == 2
    await server.close()
