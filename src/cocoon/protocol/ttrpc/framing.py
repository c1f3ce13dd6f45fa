"""ttrpc framing: the 10-byte header, reading frames from a stream, writing them atomically.

A frame is ``uint32 length | uint32 stream id | uint8 type | uint8 flags`` (big endian)
followed by ``length`` bytes of payload (containerd/ttrpc PROTOCOL.md). Payloads above
4 MiB are rejected: the reader discards them and raises :class:`OversizedFrame` with the
stream id, so the connection stays usable and the stream can be answered
RESOURCE_EXHAUSTED, as containerd's Go implementation does.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from typing import NamedTuple

from cocoon.protocol.ttrpc.errors import (
    ConnectionClosed,
    OversizedFrame,
    TruncatedFrame,
    UnknownMessageType,
)

HEADER_SIZE = 10
MAX_MESSAGE_SIZE = 4 << 20
_HEADER = struct.Struct(">IIBB")
_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack
# Discarding an oversized payload reads it in chunks of this size instead of buffering it.
_DISCARD_CHUNK = 64 << 10


class MessageType(enum.IntEnum):
    """The type byte of a frame."""

    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    """Frame flags; their meaning depends on the type (PROTOCOL.md)."""

    NONE = 0
    # Request: non-unary, the sender sends no data. Data: the sender's last message.
    REMOTE_CLOSED = 0x1
    # Request: non-unary, the sender will send data frames.
    REMOTE_OPEN = 0x2
    # Data: the frame carries no payload (an end-of-stream marker).
    NO_DATA = 0x4


_KNOWN_TYPES = frozenset(int(t) for t in MessageType)


class Frame(NamedTuple):
    """One decoded frame. ``msg_type`` and ``flags`` are plain ints on the hot path."""

    stream_id: int
    msg_type: int
    flags: int
    payload: bytes


def encode_header(stream_id: int, msg_type: int, flags: int, length: int) -> bytes:
    """The 10 header bytes of a frame."""
    return _pack_header(length, stream_id, msg_type, flags)


def encode_frame(stream_id: int, msg_type: int, flags: int, payload: bytes = b"") -> bytes:
    """A whole frame; raises :class:`OversizedFrame` if the payload is too long to send."""
    if len(payload) > MAX_MESSAGE_SIZE:
        raise OversizedFrame(
            "message too large to send", stream_id=stream_id, length=len(payload), limit=MAX_MESSAGE_SIZE
        )
    return _pack_header(len(payload), stream_id, msg_type, flags) + payload


def decode_header(header: bytes) -> tuple[int, int, int, int]:
    """``(length, stream_id, msg_type, flags)`` of a 10-byte header."""
    length, stream_id, msg_type, flags = _unpack_header(header)
    return length, stream_id, msg_type, flags


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """Read the next frame.

    Raises :class:`ConnectionClosed` on EOF at a frame boundary (or a reset),
    :class:`TruncatedFrame` on EOF inside a frame; both end the connection.
    :class:`OversizedFrame` and :class:`UnknownMessageType` are raised after the whole
    frame was consumed, so the caller may answer and keep reading.
    """
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise ConnectionClosed("connection closed by peer") from None
        raise TruncatedFrame(
            "connection closed inside a frame header", received=len(exc.partial), expected=HEADER_SIZE
        ) from None
    except OSError as exc:
        raise ConnectionClosed("connection lost", error=str(exc)) from exc

    length, stream_id, msg_type, flags = _unpack_header(header)
    if length > MAX_MESSAGE_SIZE:
        await _discard(reader, length, stream_id)
        raise OversizedFrame(
            "message too large", stream_id=stream_id, length=length, limit=MAX_MESSAGE_SIZE, msg_type=msg_type
        )
    if length:
        try:
            payload = await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise TruncatedFrame(
                "connection closed inside a frame payload",
                stream_id=stream_id, received=len(exc.partial), expected=length,
            ) from None
        except OSError as exc:
            raise ConnectionClosed("connection lost", error=str(exc)) from exc
    else:
        payload = b""
    if msg_type not in _KNOWN_TYPES:
        raise UnknownMessageType(
            f"unknown message type {msg_type:#04x}", stream_id=stream_id, msg_type=msg_type, length=length
        )
    return Frame(stream_id, msg_type, flags, payload)


async def _discard(reader: asyncio.StreamReader, length: int, stream_id: int) -> None:
    remaining = length
    try:
        while remaining:
            chunk = await reader.read(min(remaining, _DISCARD_CHUNK))
            if not chunk:
                raise TruncatedFrame(
                    "connection closed inside an oversized frame",
                    stream_id=stream_id, received=length - remaining, expected=length,
                )
            remaining -= len(chunk)
    except OSError as exc:
        raise ConnectionClosed("connection lost", error=str(exc)) from exc


class FrameWriter:
    """Writes whole frames to one connection; frames never interleave.

    :meth:`send_nowait` writes the first frame of a turn of the event loop at once and
    batches the frames sent later in the same turn into one ``write()`` at the next turn,
    so calls answered together share a syscall. It returns True when the batch or the
    transport buffer is past ``high_water``: the caller must then ``await drain()``,
    which flushes and waits for the peer to read, serialized by the per-connection
    writer lock. :meth:`send` does both. Every frame goes out as one piece, in order.
    """

    def __init__(self, writer: asyncio.StreamWriter, *, high_water: int = 256 << 10) -> None:
        self._writer = writer
        self._transport = writer.transport
        self._loop = asyncio.get_running_loop()
        self._batch: list[bytes] = []
        self._batched = 0
        self._scheduled = False
        self._high_water = high_water
        self._lock = asyncio.Lock()
        self._error: BaseException | None = None

    @property
    def closed(self) -> bool:
        return self._error is not None or self._transport.is_closing()

    def send_nowait(self, stream_id: int, msg_type: int, flags: int, payload: bytes = b"") -> bool:
        """Queue one frame; True if the caller must ``await drain()`` before sending more."""
        size = len(payload)
        if size > MAX_MESSAGE_SIZE:
            raise OversizedFrame("message too large to send", stream_id=stream_id, length=size,
                                 limit=MAX_MESSAGE_SIZE)
        if self._error is not None or self._transport.is_closing():
            raise ConnectionClosed("connection closed", error=str(self._error) if self._error else None)
        header = _pack_header(size, stream_id, msg_type, flags)
        batch = self._batch
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)
            if not batch and not self._lock.locked():
                # First frame of this turn of the loop: out at once (lowest latency for a lone
                # call); frames sent later in the same turn are batched into one write.
                self._write(header + payload if size else header)
                return self._transport.get_write_buffer_size() >= self._high_water
        batch.append(header)
        if size:
            batch.append(payload)
        self._batched += HEADER_SIZE + size
        return (self._batched >= self._high_water or self._lock.locked()
                or self._transport.get_write_buffer_size() >= self._high_water)

    async def drain(self) -> None:
        """Flush, then wait until the peer has read enough (backpressure)."""
        async with self._lock:
            self._flush()
            if self._error is not None:
                raise ConnectionClosed("connection lost while writing", error=str(self._error))
            try:
                await self._writer.drain()
            except (OSError, RuntimeError) as exc:
                self._error = exc
                raise ConnectionClosed("connection lost while writing", error=str(exc)) from exc

    async def send(self, stream_id: int, msg_type: int, flags: int, payload: bytes = b"") -> None:
        """Queue one frame, waiting only when the peer does not keep up."""
        if self.send_nowait(stream_id, msg_type, flags, payload):
            await self.drain()

    def _flush(self) -> None:
        self._scheduled = False
        batch = self._batch
        if not batch:
            return
        data = b"".join(batch) if len(batch) > 1 else batch[0]
        batch.clear()
        self._batched = 0
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self._error is not None or self._transport.is_closing():
            return
        try:
            self._transport.write(data)
        except (OSError, RuntimeError) as exc:
            self._error = exc

    async def aclose(self, timeout: float = 1.0) -> None:
        """Flush what is queued and close; a peer that does not read within ``timeout`` is cut off."""
        self._flush()
        self._writer.close()
        try:
            async with asyncio.timeout(timeout):
                await self._writer.wait_closed()
        except TimeoutError:
            self._transport.abort()
        except (OSError, RuntimeError):
            pass
