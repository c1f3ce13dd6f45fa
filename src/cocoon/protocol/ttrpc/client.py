"""The ttrpc client: many calls in flight on one connection, timeouts, cancellation, streams.

Stream ids are odd, start at 1 and grow by 2; they reach the wire in the order they are
allocated. ``timeout`` is sent as ``timeout_nano`` (the server cancels its handler when
it passes) and enforced locally too: the call raises :class:`DeadlineExceeded`.
Cancelling the calling task abandons the call; the late answer is dropped (ttrpc has
no cancel frame). When the connection ends every pending call raises
:class:`ConnectionClosed`.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from cocoon import log
from cocoon.protocol.ttrpc.errors import (
    ConnectionClosed,
    DeadlineExceeded,
    FrameError,
    OversizedFrame,
    PayloadError,
    ProtocolError,
    ResourceExhausted,
    RPCError,
    UnknownMessageType,
)
from cocoon.protocol.ttrpc.framing import Flags, Frame, FrameWriter, MessageType, read_frame
from cocoon.protocol.ttrpc.transport import Transport, UnixTransport, VsockTransport
from cocoon.protocol.ttrpc.wire import Metadata, decode_response, encode_request

_log = log.get_logger("protocol")

M = TypeVar("M", bound=Message)

_REQUEST = MessageType.REQUEST.value
_RESPONSE = MessageType.RESPONSE.value
_DATA = MessageType.DATA.value
_REMOTE_CLOSED = Flags.REMOTE_CLOSED.value
_REMOTE_OPEN = Flags.REMOTE_OPEN.value
_NO_DATA = Flags.NO_DATA.value
_MAX_STREAM_ID = 0xFFFFFFFF
# Frames a client stream buffers before it is failed with RESOURCE_EXHAUSTED: a peer (the
# guest, which the host does not trust) must not make the host buffer without bound.
CLIENT_STREAM_BUFFER = 256


def _parse(response_type: type[M], data: bytes, method: str) -> M:
    try:
        return response_type.FromString(data)
    except Exception as exc:
        raise PayloadError("cannot decode response payload", method=method, error=str(exc)) from exc


class Client:
    """A ttrpc client on one connection. Create with :meth:`connect` or :func:`connect_unix`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, name: str = "") -> None:
        self.name = name or str(writer.get_extra_info("peername") or "stream")
        self._loop = asyncio.get_running_loop()
        self._reader = reader
        self._writer = FrameWriter(writer)
        self._next_id = 1
        self._calls: dict[int, asyncio.Future[Frame]] = {}
        self._streams: dict[int, ClientStream[Any]] = {}
        self._error: ConnectionClosed | None = None
        self._receiver = self._loop.create_task(self._receive(), name=f"ttrpc client {self.name}")

    @classmethod
    async def connect(cls, transport: Transport) -> Client:
        """Connect through ``transport``; raises :class:`Unavailable` if that fails."""
        reader, writer = await transport.connect()
        return cls(reader, writer, name=repr(transport))

    @property
    def closed(self) -> bool:
        return self._error is not None

    # ---- calls

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> M:
        """Unary call of ``/service/method``; returns the response or raises an :class:`RPCError`.

        ``timeout`` (seconds; None or ``math.inf`` for none) bounds the call here and on the server.
        """
        if self._error is not None:
            raise self._closed_error(method=f"/{service}/{method}")
        if timeout is not None and not timeout < math.inf:
            timeout = None  # math.inf: no deadline
        envelope = encode_request(service, method, request.SerializeToString(), timeout, metadata)
        sid = self._allocate()
        future: asyncio.Future[Frame] = self._loop.create_future()
        self._calls[sid] = future
        try:
            if timeout is None:
                if self._writer.send_nowait(sid, _REQUEST, 0, envelope):
                    await self._writer.drain()
                frame = await future
            else:
                async with asyncio.timeout(timeout):
                    await self._writer.send(sid, _REQUEST, 0, envelope)
                    frame = await future
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded", method=f"/{service}/{method}", timeout=timeout) from None
        except ProtocolError as exc:
            exc.add_context(method=f"/{service}/{method}")
            raise
        finally:
            del self._calls[sid]
        if frame.msg_type != _RESPONSE:
            raise PayloadError("unexpected data frame on a unary call", method=f"/{service}/{method}", stream_id=sid)
        return _parse(response_type, decode_response(frame.payload, method=f"/{service}/{method}"),
                      f"/{service}/{method}")

    async def stream(
        self,
        service: str,
        method: str,
        response_type: type[M],
        request: Message | None = None,
        *,
        client_streaming: bool = False,
        server_streaming: bool = True,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ClientStream[M]:
        """Open a streaming call; ``request`` is the first (or only) message from this side.

        Use the returned :class:`ClientStream` to ``send``/``close_send`` (client streaming)
        and ``recv``/``async for`` (server streaming); close it with ``aclose`` or ``async with``.
        """
        if self._error is not None:
            raise self._closed_error(method=f"/{service}/{method}")
        if timeout is not None and not timeout < math.inf:
            timeout = None
        payload = b"" if request is None else request.SerializeToString()
        envelope = encode_request(service, method, payload, timeout, metadata)
        sid = self._allocate()
        stream: ClientStream[M] = ClientStream(
            self, sid, f"/{service}/{method}", response_type,
            client_streaming=client_streaming, server_streaming=server_streaming, timeout=timeout,
        )
        self._streams[sid] = stream
        try:
            await self._writer.send(sid, _REQUEST, _REMOTE_OPEN if client_streaming else _REMOTE_CLOSED, envelope)
        except BaseException:
            self._streams.pop(sid, None)
            raise
        return stream

    def _allocate(self) -> int:
        sid = self._next_id
        if sid > _MAX_STREAM_ID:
            raise ConnectionClosed("stream ids exhausted; reconnect", client=self.name)
        self._next_id = sid + 2
        return sid

    # ---- receiving

    async def _receive(self) -> None:
        error = ConnectionClosed("connection closed by peer", client=self.name)
        try:
            while True:
                try:
                    frame = await read_frame(self._reader)
                except OversizedFrame as exc:
                    self._fail_stream(exc.stream_id, ResourceExhausted(str(exc)))
                    continue
                except UnknownMessageType as exc:
                    _log.debug("ignoring frame of unknown type", client=self.name, error=str(exc))
                    continue
                sid = frame.stream_id
                future = self._calls.get(sid)
                if future is not None:
                    if not future.done():
                        future.set_result(frame)
                    continue
                stream = self._streams.get(sid)
                if stream is not None:
                    stream._deliver(frame)
                else:
                    _log.debug("dropping frame for inactive stream", client=self.name, stream_id=sid)
        except ConnectionClosed as exc:
            error = exc
        except FrameError as exc:
            error = ConnectionClosed("connection closed inside a frame", client=self.name, error=str(exc))
        except asyncio.CancelledError:
            error = ConnectionClosed("client closed", client=self.name)
            raise
        finally:
            self._shutdown(error)

    def _fail_stream(self, sid: int, error: ProtocolError) -> None:
        future = self._calls.get(sid)
        if future is not None and not future.done():
            future.set_exception(error)
        stream = self._streams.get(sid)
        if stream is not None:
            stream._fail(error)

    def _closed_error(self, **context: Any) -> ConnectionClosed:
        """A fresh ConnectionClosed like the one that closed the client (one instance per raiser)."""
        error = self._error or ConnectionClosed("client closed", client=self.name)
        return ConnectionClosed(error.message, **{**error.context, **context})

    def _shutdown(self, error: ConnectionClosed) -> None:
        if self._error is None:
            self._error = error
        for future in self._calls.values():
            if not future.done():
                future.set_exception(self._closed_error())
        for stream in list(self._streams.values()):
            stream._fail(self._closed_error(method=stream.method))

    async def close(self) -> None:
        """Close the connection; pending calls raise :class:`ConnectionClosed`."""
        self._shutdown(ConnectionClosed("client closed", client=self.name))
        self._receiver.cancel()
        await asyncio.wait([self._receiver])
        await self._writer.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class ClientStream(Generic[M]):
    """The client side of a streaming call (see :meth:`Client.stream`)."""

    def __init__(self, client: Client, stream_id: int, method: str, response_type: type[M], *,
                 client_streaming: bool, server_streaming: bool, timeout: float | None) -> None:
        self.stream_id = stream_id
        self.method = method
        self._client = client
        self._response_type = response_type
        self._client_streaming = client_streaming
        self._server_streaming = server_streaming
        self._deadline = None if timeout is None else client._loop.time() + timeout
        self._frames: deque[Frame] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: ProtocolError | None = None
        self.local_closed = not client_streaming
        self.remote_closed = False

    def _deliver(self, frame: Frame) -> None:
        if len(self._frames) >= CLIENT_STREAM_BUFFER:
            self._fail(ResourceExhausted("stream receive buffer is full", method=self.method))
            return
        self._frames.append(frame)
        self._wake()

    def _fail(self, error: ProtocolError) -> None:
        if self._error is None:
            self._error = error
        self._client._streams.pop(self.stream_id, None)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def send(self, message: Message) -> None:
        """Send one message to the server (client-streaming calls)."""
        if self.local_closed:
            raise ProtocolError("stream is closed for sending", method=self.method, stream_id=self.stream_id)
        if self._error is not None:
            raise self._error
        await self._client._writer.send(self.stream_id, _DATA, 0, message.SerializeToString())

    async def close_send(self) -> None:
        """Tell the server this side sent its last message."""
        if self.local_closed:
            return
        self.local_closed = True
        if self._error is None:
            await self._client._writer.send(self.stream_id, _DATA, _REMOTE_CLOSED | _NO_DATA, b"")

    async def recv(self) -> M | None:
        """The next message from the server, or None at the end of the stream."""
        while not self._frames:
            if self.remote_closed:
                return None
            if self._error is not None:
                raise self._error
            self._waiter = self._client._loop.create_future()
            try:
                if self._deadline is None:
                    await self._waiter
                else:
                    async with asyncio.timeout_at(self._deadline):
                        await self._waiter
            except TimeoutError:
                error = DeadlineExceeded("deadline exceeded", method=self.method)
                self._fail(error)
                raise error from None
            finally:
                self._waiter = None
        frame = self._frames.popleft()
        if frame.msg_type == _RESPONSE:
            self._finish()
            data = decode_response(frame.payload, method=self.method)
            if self._server_streaming and not data:
                return None
            return _parse(self._response_type, data, self.method)
        if frame.msg_type != _DATA:
            unexpected = PayloadError("unexpected frame type on a stream", method=self.method)
            self._fail(unexpected)
            raise unexpected
        if frame.flags & _REMOTE_CLOSED:
            self._finish()
            if frame.flags & _NO_DATA:
                return None
        return _parse(self._response_type, frame.payload, self.method)

    def _finish(self) -> None:
        self.remote_closed = True
        self._client._streams.pop(self.stream_id, None)

    def __aiter__(self) -> AsyncIterator[M]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[M]:
        while (message := await self.recv()) is not None:
            yield message

    async def aclose(self) -> None:
        """Abandon the stream; frames still arriving for it are dropped."""
        self.local_closed = True
        if not self.remote_closed:
            self._finish()

    async def __aenter__(self) -> ClientStream[M]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def connect_unix(path: str | os.PathLike[str]) -> Client:
    """A client connected to the unix socket at ``path``."""
    return await Client.connect(UnixTransport(path))


async def connect_vsock(cid: int, port: int) -> Client:
    """A client connected to AF_VSOCK ``(cid, port)``."""
    return await Client.connect(VsockTransport(cid, port))


__all__ = ["CLIENT_STREAM_BUFFER", "Client", "ClientStream", "RPCError", "connect_unix", "connect_vsock"]
