"""ttrpc over a character device with no connection semantics (a virtio-serial port).

A virtio-serial port in the guest is a byte pipe to a host chardev (usually a unix
socket QEMU listens on). There is no accept(): the port just reads EOF and polls
POLLHUP while the host side is closed, and works again when a host process connects.
A host that goes away mid-frame leaves a partial frame behind, so every *session*
(host connected -> host gone) gets a fresh reader: the partial frame dies with the old
one, and the next session starts on a clean frame boundary. The guest-side port is
reopened per session, which also makes the kernel discard unread bytes of the old one.

The reopen logic is injectable for tests: ``opener`` returns a fresh fd for the device,
``peer_present(fd)`` says whether a peer is attached (default: poll() shows no POLLHUP).
"""

from __future__ import annotations

import asyncio
import os
import select
from collections.abc import Callable
from typing import Any

from cocoon import log
from cocoon.protocol.ttrpc.errors import Unavailable
from cocoon.protocol.ttrpc.transport import STREAM_LIMIT, ConnectionHandler, Listener, Transport

_log = log.get_logger("protocol")

Opener = Callable[[], int]
PeerProbe = Callable[[int], bool]


def poll_peer_present(fd: int) -> bool:
    """True unless poll() reports a hangup (no host attached to the port) or an error."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    gone = select.POLLHUP | select.POLLERR | select.POLLNVAL
    return not any(revents & gone for _, revents in poller.poll(0))


class _WriteProtocol(asyncio.streams.FlowControlMixin):
    """The write side of a session: flow control, the close waiter StreamWriter expects,
    and closing the read side with it so that closing the writer releases both fds."""

    def __init__(self, read_transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(loop=loop)
        self._read_transport = read_transport
        self._closed: asyncio.Future[None] = loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._read_transport.close()
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: Any) -> asyncio.Future[None]:
        return self._closed


class CharDevTransport(Transport):
    """A character device (``/dev/vport0p1``) carrying ttrpc, one session at a time.

    ``listen()`` serves sessions back to back: wait for the peer (polling every
    ``poll_interval`` seconds, never spinning), serve until EOF/hangup, drop the partial
    frame, repeat. ``connect()`` opens one session for a client on the device side.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        poll_interval: float = 0.02,
        opener: Opener | None = None,
        peer_present: PeerProbe | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.poll_interval = poll_interval
        self._opener = opener or self._open_device
        self._peer_present = peer_present or poll_peer_present

    def __repr__(self) -> str:
        return f"chardev:{self.path}"

    def _open_device(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)

    async def wait_for_peer(self) -> int:
        """Open the device and return its fd once a peer is attached; retries while it cannot be opened."""
        warned = False
        while True:
            try:
                fd = self._opener()
            except OSError as exc:
                if not warned:
                    _log.warning("cannot open device, retrying", device=self.path, error=str(exc))
                    warned = True
                await asyncio.sleep(self.poll_interval)
                continue
            try:
                while not self._peer_present(fd):
                    await asyncio.sleep(self.poll_interval)
            except BaseException:
                os.close(fd)
                raise
            return fd

    async def open_session(self, fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Stream reader/writer over ``fd`` for one session; they own (and close) ``fd``."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
        read_file = os.fdopen(fd, "rb", buffering=0)
        try:
            write_file = os.fdopen(os.dup(fd), "wb", buffering=0)
        except BaseException:
            read_file.close()
            raise
        try:
            read_transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader, loop=loop), read_file
            )
        except BaseException:
            read_file.close()
            write_file.close()
            raise
        try:
            transport, protocol = await loop.connect_write_pipe(lambda: _WriteProtocol(read_transport), write_file)
        except BaseException:
            write_file.close()
            read_transport.close()
            raise
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            fd = self._opener()
        except OSError as exc:
            raise Unavailable("cannot open device", transport=repr(self), error=str(exc)) from exc
        if not self._peer_present(fd):
            os.close(fd)
            raise Unavailable("no peer attached to the device", transport=repr(self))
        return await self.open_session(fd)

    async def listen(self, handle: ConnectionHandler) -> Listener:
        return _SessionLoop(self, handle)


class _SessionLoop(Listener):
    """Serves sessions back to back until closed."""

    def __init__(self, transport: CharDevTransport, handle: ConnectionHandler) -> None:
        self._transport = transport
        self._handle = handle
        self._in_session = False
        self._stopping = False
        self.sessions = 0
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"ttrpc {transport!r}")

    async def _run(self) -> None:
        while not self._stopping:
            fd = await self._transport.wait_for_peer()
            try:
                reader, writer = await self._transport.open_session(fd)
            except OSError as exc:
                _log.warning("cannot start session", device=self._transport.path, error=str(exc))
                await asyncio.sleep(self._transport.poll_interval)
                continue
            self.sessions += 1
            self._in_session = True
            _log.debug("session started", device=self._transport.path, session=self.sessions)
            try:
                await self._handle(reader, writer)
            finally:
                self._in_session = False
                writer.close()  # closes the read side too
            _log.debug("session ended", device=self._transport.path, session=self.sessions)

    async def aclose(self) -> None:
        """Stop serving: at once when waiting for a peer, else when the current session ends."""
        self._stopping = True
        if not self._in_session:
            self._task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.wait({self._task})
        if not self._task.cancelled() and self._task.exception() is not None:
            _log.error("session loop failed", device=self._transport.path, exc_info=self._task.exception())
