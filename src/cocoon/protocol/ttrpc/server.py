"""The ttrpc server: registers handlers, accepts connections, runs one task per request.

Behaviour follows containerd's Go server (server.go, services.go): client stream ids
must be odd and increasing; a bad frame or envelope is answered on its stream with
INVALID_ARGUMENT (RESOURCE_EXHAUSTED for an oversized one) and the connection goes
on; an unknown service or method is UNIMPLEMENTED; ``timeout_nano`` bounds the
handler, which is cancelled when it passes (DEADLINE_EXCEEDED); when the client goes
away its handlers are cancelled. Nothing a peer sends crashes the server or stalls
other connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from cocoon import errors, log
from cocoon.protocol.ttrpc.chardev import CharDevTransport
from cocoon.protocol.ttrpc.errors import (
    BadStreamId,
    Code,
    ConnectionClosed,
    FrameError,
    InvalidArgument,
    OversizedFrame,
    PayloadError,
    ProtocolError,
    ResourceExhausted,
    Unimplemented,
    UnknownMessageType,
    status_for_exception,
)
from cocoon.protocol.ttrpc.framing import MAX_MESSAGE_SIZE, Flags, FrameWriter, MessageType, read_frame
from cocoon.protocol.ttrpc.stream import ServerStream
from cocoon.protocol.ttrpc.transport import (
    VMADDR_CID_ANY,
    Listener,
    Transport,
    UnixTransport,
    VsockTransport,
)
from cocoon.protocol.ttrpc.wire import decode_request, encode_error_response, encode_ok_response, metadata_of

_log = log.get_logger("protocol")

_REQUEST = MessageType.REQUEST.value
_RESPONSE = MessageType.RESPONSE.value
_DATA = MessageType.DATA.value
_REMOTE_CLOSED = Flags.REMOTE_CLOSED.value
_NO_DATA = Flags.NO_DATA.value

UnaryHandler = Callable[[Any, "ServerContext"], Awaitable[Message]]
StreamHandler = Callable[[ServerStream, "ServerContext"], Awaitable[Message | None]]


class ServerContext:
    """What a handler knows about its call besides the request."""

    __slots__ = ("deadline", "metadata", "method", "service", "stream_id")

    def __init__(
        self, service: str, method: str, metadata: dict[str, list[str]], deadline: float | None, stream_id: int
    ) -> None:
        self.service = service
        self.method = method
        #: Request metadata, key -> values.
        self.metadata = metadata
        #: Event-loop time (``loop.time()``) at which the call times out, or None.
        self.deadline = deadline
        self.stream_id = stream_id

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), or None without one."""
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()


@dataclass(frozen=True, slots=True)
class _Method:
    service: str
    name: str
    request_type: type[Message]
    handler: Callable[..., Awaitable[Any]]
    client_streaming: bool = False
    server_streaming: bool = False

    @property
    def unary(self) -> bool:
        return not (self.client_streaming or self.server_streaming)


class Server:
    """A ttrpc server. Register handlers, then ``await serve_unix(path)`` (or another transport).

    ``max_concurrent_requests`` bounds the handlers running for one connection; more
    are refused with RESOURCE_EXHAUSTED. ``async with Server() as server:`` closes it.
    """

    def __init__(self, *, max_concurrent_requests: int = 1024) -> None:
        self.max_concurrent_requests = max_concurrent_requests
        self._methods: dict[tuple[str, str], _Method] = {}
        self._services: set[str] = set()
        self._listeners: list[Listener] = []
        self._connections: set[_Connection] = set()
        self._shutting_down = False
        self._closed = asyncio.Event()

    # ---- registration

    def register(self, service: str, method: str, request_type: type[Message], handler: UnaryHandler) -> None:
        """Serve ``/service/method``: ``await handler(request, ctx)`` returns the response message."""
        self._add(_Method(service, method, request_type, _checked(handler, service, method)))

    def register_stream(
        self,
        service: str,
        method: str,
        request_type: type[Message],
        handler: StreamHandler,
        *,
        client_streaming: bool,
        server_streaming: bool,
    ) -> None:
        """Serve a streaming method: ``await handler(stream, ctx)``; see :class:`ServerStream`.

        The returned message (or None) ends the stream: as the final Response when only
        the client streams, else as the last Data frame.
        """
        self._add(_Method(service, method, request_type, _checked(handler, service, method),
                          client_streaming=client_streaming, server_streaming=server_streaming))

    def register_service(self, service: ServiceDescriptor | str, impl: object) -> None:
        """Serve every RPC of a protobuf service with the same-named async method of ``impl``.

        Methods ``impl`` lacks answer UNIMPLEMENTED. Streaming RPCs get the
        :meth:`register_stream` signature.
        """
        if isinstance(service, str):
            try:
                service = descriptor_pool.Default().FindServiceByName(service)
            except KeyError:
                raise errors.NotFound("no such protobuf service", service=service) from None
        for method in service.methods:
            request_type: type[Message] = message_factory.GetMessageClass(method.input_type)
            handler = getattr(impl, method.name, None)
            if handler is None:
                handler = _unimplemented(service.full_name, method.name)
            if method.client_streaming or method.server_streaming:
                self.register_stream(service.full_name, method.name, request_type, handler,
                                     client_streaming=method.client_streaming,
                                     server_streaming=method.server_streaming)
            else:
                self.register(service.full_name, method.name, request_type, handler)

    def _add(self, method: _Method) -> None:
        key = (method.service, method.name)
        if key in self._methods:
            raise errors.AlreadyExists("method already registered", method=f"/{method.service}/{method.name}")
        self._methods[key] = method
        self._services.add(method.service)

    # ---- serving

    async def serve(self, transport: Transport) -> None:
        """Start accepting on ``transport``; returns once listening. Serves until shutdown."""
        if self._shutting_down:
            raise errors.StateError("server is shut down", state="closed", required="serving")
        self._listeners.append(await transport.listen(self.serve_connection))
        _log.debug("listening", transport=repr(transport))

    async def serve_unix(self, path: str | os.PathLike[str], *, mode: int = 0o600) -> None:
        """Listen on a unix socket at ``path`` (created with ``mode``, removed on shutdown)."""
        await self.serve(UnixTransport(path, mode=mode))

    async def serve_vsock(self, port: int, *, cid: int = VMADDR_CID_ANY) -> None:
        """Listen on AF_VSOCK ``port`` (in the guest: any cid)."""
        await self.serve(VsockTransport(cid, port))

    async def serve_chardev(self, path: str | os.PathLike[str], **options: Any) -> None:
        """Serve sessions on a character device such as a virtio-serial port (see :mod:`.chardev`)."""
        await self.serve(CharDevTransport(path, **options))

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one established connection (any byte stream) until it closes."""
        if self._shutting_down:
            writer.close()
            return
        conn = _Connection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
            conn.done.set_result(None)

    @property
    def connection_count(self) -> int:
        """Connections being served now."""
        return len(self._connections)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, let running requests finish for up to ``grace`` seconds, then close everything.

        New requests during the grace period are refused with UNAVAILABLE.
        """
        self._shutting_down = True
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            await listener.aclose()
        busy = [conn.idle for conn in self._connections if not conn.idle.is_set()]
        if busy and grace > 0:
            try:
                async with asyncio.timeout(grace):
                    for idle in busy:
                        await idle.wait()
            except TimeoutError:
                _log.warning("shutdown grace period over, cancelling requests", grace=grace)
        for conn in list(self._connections):
            conn.close()
        for listener in listeners:
            await listener.wait_closed()
        while self._connections:
            await asyncio.wait([conn.done for conn in self._connections])
        self._closed.set()

    async def close(self) -> None:
        """Shut down at once, cancelling running requests."""
        await self.shutdown(grace=0)

    async def wait_closed(self) -> None:
        """Wait until the server was shut down."""
        await self._closed.wait()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _checked(handler: Callable[..., Awaitable[Any]], service: str, method: str) -> Callable[..., Awaitable[Any]]:
    if not inspect.iscoroutinefunction(handler):
        raise errors.InvalidArgument("handler must be an async function", method=f"/{service}/{method}")
    return handler


def _unimplemented(service: str, method: str) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, ctx: ServerContext) -> Any:
        raise Unimplemented(f"method {method} of {service} is not implemented")

    return handler


class _Connection:
    """One client connection: the read loop, its request tasks and active streams."""

    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = FrameWriter(writer)
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        self.streams: dict[int, ServerStream] = {}
        self.last_stream_id = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.done = self.loop.create_future()
        self.peer = str(writer.get_extra_info("peername") or writer.get_extra_info("sockname") or "stream")
        self.warned = False
        self.congested = False
        self.reading: asyncio.Task[None]

    async def run(self) -> None:
        """Serve until the peer goes away or :meth:`close`; then cancel what still runs."""
        self.reading = self.loop.create_task(self.read_loop(), name=f"ttrpc conn {self.peer}")
        try:
            await asyncio.wait([self.reading])
        finally:
            self.reading.cancel()
            await self.teardown()

    async def read_loop(self) -> None:
        try:
            while True:
                try:
                    sid, msg_type, flags, payload = await read_frame(self.reader)
                except OversizedFrame as exc:
                    self._violation(exc)
                    self.reject(exc.stream_id, Code.RESOURCE_EXHAUSTED,
                                f"message length {exc.length} exceed maximum message size of {MAX_MESSAGE_SIZE}")
                except UnknownMessageType as exc:
                    self._violation(exc)
                    self.reject(exc.stream_id, Code.INVALID_ARGUMENT, exc.message)
                else:
                    if not sid & 1:
                        self._violation(BadStreamId("even stream id from client", stream_id=sid))
                        self.reject(sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
                    elif msg_type == _REQUEST:
                        self.on_request(sid, flags, payload)
                    elif msg_type == _DATA:
                        self.on_data(sid, flags, payload)
                    else:
                        self.reject(sid, Code.INVALID_ARGUMENT, "unexpected response message from client")
                if self.congested:
                    await self.flush()  # stop reading from a peer that does not read its answers
        except FrameError as exc:  # truncated: the peer closed inside a frame
            _log.debug("connection dropped", peer=self.peer, error=str(exc))
        except ConnectionClosed:
            pass
        except Exception:
            _log.exception("connection failed", peer=self.peer)

    def _violation(self, exc: ProtocolError) -> None:
        if not self.warned:
            self.warned = True
            _log.warning("peer violated the ttrpc protocol", peer=self.peer, error=str(exc))
        else:
            _log.debug("peer violated the ttrpc protocol", peer=self.peer, error=str(exc))

    def on_request(self, sid: int, flags: int, payload: bytes) -> None:
        if sid <= self.last_stream_id:
            self._violation(BadStreamId("stream id reused", stream_id=sid, last=self.last_stream_id))
            self.reject(sid, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment")
            return
        self.last_stream_id = sid
        try:
            request = decode_request(payload)
        except PayloadError as exc:
            self._violation(exc)
            self.reject(sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc.context['error']}")
            return
        server = self.server
        method = server._methods.get((request.service, request.method))
        if method is None:
            what = f"method {request.method}" if request.service in server._services else f"service {request.service}"
            self.reject(sid, Code.UNIMPLEMENTED, what)
            return
        if server._shutting_down:
            self.reject(sid, Code.UNAVAILABLE, "server is shutting down")
            return
        if len(self.tasks) >= server.max_concurrent_requests:
            self.reject(sid, Code.RESOURCE_EXHAUSTED, "too many concurrent requests on this connection")
            return
        timeout = request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        ctx = ServerContext(
            method.service, method.name, metadata_of(request) if request.metadata else {},
            None if timeout is None else self.loop.time() + timeout, sid,
        )
        if method.unary:
            coro = self.run_unary(sid, method, request.payload, ctx, timeout)
        else:
            stream = ServerStream(self.writer, sid, method.request_type, method.server_streaming)
            if request.payload or not method.client_streaming:
                stream.feed(request.payload)
            if not method.client_streaming or flags & _REMOTE_CLOSED or not flags:
                stream.close_recv()
            self.streams[sid] = stream
            coro = self.run_stream(sid, method, stream, ctx, timeout)
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        self.idle.clear()
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not self.tasks:
            self.idle.set()

    def on_data(self, sid: int, flags: int, payload: bytes) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.recv_closed:
            self.reject(sid, Code.INVALID_ARGUMENT, "StreamID is no longer active")
            return
        if not flags & _NO_DATA and not stream.feed(payload):
            del self.streams[sid]
            stream.abort(ResourceExhausted("stream receive buffer is full", stream_id=sid))
            self.reject(sid, Code.RESOURCE_EXHAUSTED, "stream receive buffer is full")
            return
        if flags & _REMOTE_CLOSED:
            stream.close_recv()

    async def run_unary(self, sid: int, method: _Method, payload: bytes, ctx: ServerContext,
                        timeout: float | None) -> None:
        try:
            try:
                request = method.request_type.FromString(payload)
            except Exception as exc:
                raise InvalidArgument(f"unmarshal request payload: {exc}") from exc
            if timeout is None:
                response = await method.handler(request, ctx)
            else:
                async with asyncio.timeout(timeout):
                    response = await method.handler(request, ctx)
            if not isinstance(response, Message):
                raise TypeError(f"handler returned {type(response).__name__}, not a protobuf message")
            self.enqueue(sid, _RESPONSE, 0, encode_ok_response(response.SerializeToString()))
        except Exception as exc:
            self.reject(sid, *self.status_of(exc, ctx))
        if self.congested:
            await self.flush()

    async def run_stream(self, sid: int, method: _Method, stream: ServerStream, ctx: ServerContext,
                         timeout: float | None) -> None:
        try:
            try:
                if timeout is None:
                    result = await method.handler(stream, ctx)
                else:
                    async with asyncio.timeout(timeout):
                        result = await method.handler(stream, ctx)
                data = None if result is None else result.SerializeToString()
            except Exception as exc:
                if stream.aborted is None:  # else the client was already answered
                    await self.send_error(sid, *self.status_of(exc, ctx))
                return
            if stream.aborted is not None:
                return
            if method.server_streaming:
                await self.send(sid, _DATA, _REMOTE_CLOSED | (_NO_DATA if data is None else 0), data or b"")
            else:
                await self.send(sid, _RESPONSE, 0, encode_ok_response(data or b""))
        finally:
            self.streams.pop(sid, None)

    def status_of(self, exc: Exception, ctx: ServerContext) -> tuple[Code, str]:
        code, message = status_for_exception(exc)
        full = f"/{ctx.service}/{ctx.method}"
        if code == Code.INTERNAL:
            _log.error("handler failed", method=full, peer=self.peer, exc_info=exc)
        else:
            _log.debug("handler returned an error", method=full, code=code.name, error=message)
        return code, message

    def enqueue(self, sid: int, msg_type: int, flags: int, payload: bytes) -> None:
        """Queue a frame; a response too large for a frame becomes RESOURCE_EXHAUSTED."""
        if len(payload) > MAX_MESSAGE_SIZE:
            payload = encode_error_response(
                Code.RESOURCE_EXHAUSTED, f"response of {len(payload)} bytes exceeds the maximum message size"
            )
            msg_type, flags = _RESPONSE, 0
        try:
            if self.writer.send_nowait(sid, msg_type, flags, payload):
                self.congested = True
        except ConnectionClosed:
            pass  # the peer is gone; the read loop notices and tears down

    def reject(self, sid: int, code: Code, message: str) -> None:
        """Answer a stream with an error status."""
        self.enqueue(sid, _RESPONSE, 0, encode_error_response(code, message))

    async def flush(self) -> None:
        """Wait for the peer to catch up if the output backed up."""
        if self.congested:
            self.congested = False
            with contextlib.suppress(ConnectionClosed):  # the read loop notices and tears down
                await self.writer.drain()

    async def send(self, sid: int, msg_type: int, flags: int, payload: bytes) -> None:
        self.enqueue(sid, msg_type, flags, payload)
        if self.congested:
            await self.flush()

    async def send_error(self, sid: int, code: Code, message: str) -> None:
        await self.send(sid, _RESPONSE, 0, encode_error_response(code, message))

    def close(self) -> None:
        """Stop reading; :meth:`run` then tears the connection down."""
        self.reading.cancel()

    async def teardown(self) -> None:
        await asyncio.wait([self.reading])
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)
        for stream in self.streams.values():
            stream.abort(ConnectionClosed("connection closed"))
        self.streams.clear()
        await self.writer.aclose()
