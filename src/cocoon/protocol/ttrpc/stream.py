"""The server side of a streaming call: messages in (Data frames), messages out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.message import Message

from cocoon.protocol.ttrpc.errors import InvalidArgument, ProtocolError, ResourceExhausted
from cocoon.protocol.ttrpc.framing import FrameWriter, MessageType

# Messages a stream buffers before the client is told RESOURCE_EXHAUSTED (Go buffers 64 and
# gives up after a second; the read loop must never block on one slow stream).
STREAM_BUFFER = 64

_DATA = MessageType.DATA.value
_END = object()


class ServerStream:
    """Handed to a streaming handler: ``await recv()`` / ``async for`` what the client sends,
    ``await send(msg)`` to stream messages back (server-streaming methods only)."""

    def __init__(self, writer: FrameWriter, stream_id: int, request_type: type[Message], server_streaming: bool):
        self.stream_id = stream_id
        self._writer = writer
        self._request_type = request_type
        self._server_streaming = server_streaming
        self._queue: asyncio.Queue[Any] = asyncio.Queue(STREAM_BUFFER + 1)
        self.recv_closed = False
        #: Set once the stream was answered with an error outside the handler.
        self.aborted: ProtocolError | None = None

    # ---- fed by the connection's read loop

    def feed(self, payload: bytes) -> bool:
        """Queue one message from the client; False when the buffer is full."""
        if self._queue.qsize() >= STREAM_BUFFER:
            return False
        self._queue.put_nowait(payload)
        return True

    def close_recv(self) -> None:
        """The client sent its last message."""
        if not self.recv_closed:
            self.recv_closed = True
            self._queue.put_nowait(_END)

    def abort(self, error: ProtocolError | None = None) -> None:
        """Fail the stream: ``recv`` raises ``error`` from now on."""
        self.aborted = error or ResourceExhausted("stream aborted")
        self.recv_closed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_END)

    # ---- used by the handler

    async def recv(self) -> Any:
        """The next message from the client, or None once it closed its side."""
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # every later recv() sees the end too
            if self.aborted is not None:
                raise self.aborted
            return None
        try:
            return self._request_type.FromString(item)
        except Exception as exc:
            raise InvalidArgument(f"unmarshal stream message: {exc}") from exc

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while (message := await self.recv()) is not None:
            yield message

    async def send(self, message: Message) -> None:
        """Stream one message to the client."""
        if not self._server_streaming:
            raise InvalidArgument("method does not stream responses", stream_id=self.stream_id)
        if self.aborted is not None:
            raise self.aborted
        await self._writer.send(self.stream_id, _DATA, 0, message.SerializeToString())
