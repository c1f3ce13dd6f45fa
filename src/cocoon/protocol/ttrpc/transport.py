"""Byte-stream transports for ttrpc: one small interface, one class per kind of channel.

A :class:`Transport` can ``connect()`` (client side: a reader/writer pair) and
``listen(handle)`` (server side: call ``handle(reader, writer)`` for every connection
until the returned :class:`Listener` is closed). Implementations: :class:`UnixTransport`,
:class:`VsockTransport` (AF_VSOCK, cid + port) and, in :mod:`.chardev`,
:class:`~cocoon.protocol.ttrpc.chardev.CharDevTransport` for virtio-serial ports.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from cocoon import errors, log
from cocoon.protocol.ttrpc.errors import Unavailable

_log = log.get_logger("protocol")

ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]

# StreamReader buffer limit: how much it buffers before pausing the transport.
STREAM_LIMIT = 1 << 20

VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_LOCAL = 1
VMADDR_CID_HOST = 2

_TRANSIENT_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED})


class Listener(abc.ABC):
    """A transport accepting connections; close it to stop accepting."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop accepting new connections (connections already handed out stay open)."""

    async def wait_closed(self) -> None:  # noqa: B027 - most listeners have nothing to wait for
        """Wait until the listener has stopped entirely (after its connections were closed)."""


class Transport(abc.ABC):
    """Where ttrpc bytes flow: something to connect to, or to listen on."""

    @abc.abstractmethod
    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open one connection; raises :class:`Unavailable` if the peer cannot be reached."""

    @abc.abstractmethod
    async def listen(self, handle: ConnectionHandler) -> Listener:
        """Start accepting; returns once accepting, ``handle`` runs once per connection."""


class _AcceptLoop(Listener):
    """Accepts on a listening socket and runs ``handle`` for each connection in its own task.

    Not asyncio.start_server: its Server.close() leaves a connection accepted just before
    the close half set up (the socket stays open, the client hangs). Here accepting and
    wrapping happen in one task, so closing either hands a connection over or closes it,
    and connections still in the kernel backlog are reset when the socket closes.
    """

    def __init__(self, sock: socket.socket, handle: ConnectionHandler, name: str,
                 cleanup: Callable[[], None] | None = None) -> None:
        self._sock = sock
        self._handle = handle
        self._cleanup = cleanup
        self._loop = asyncio.get_running_loop()
        self._connections: set[asyncio.Task[None]] = set()
        self._task = self._loop.create_task(self._accept(), name=f"ttrpc accept {name}")
        self.name = name

    async def _accept(self) -> None:
        backoff = 0.0
        while True:
            try:
                conn, _ = await self._loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno not in _TRANSIENT_ACCEPT_ERRORS:
                    _log.error("accept failed, not listening any more", listener=self.name, error=str(exc))
                    return
                # Out of fds or memory: back off like containerd's server instead of spinning.
                backoff = min(1.0, backoff * 2 or 0.005)
                _log.warning("accept failed, backing off", listener=self.name, error=str(exc), seconds=backoff)
                await asyncio.sleep(backoff)
                continue
            backoff = 0.0
            try:
                conn.setblocking(False)
                reader, writer = await asyncio.open_connection(sock=conn, limit=STREAM_LIMIT)
            except BaseException:
                conn.close()
                raise
            task = self._loop.create_task(self._handle(reader, writer))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.wait([self._task])
        self._sock.close()
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None

    async def wait_closed(self) -> None:
        if self._connections:
            await asyncio.wait(self._connections)


class UnixTransport(Transport):
    """A unix stream socket at ``path``; the server side creates it with ``mode``."""

    def __init__(self, path: str | os.PathLike[str], *, mode: int = 0o600) -> None:
        self.path = Path(path)
        self.mode = mode

    def __repr__(self) -> str:
        return f"unix:{self.path}"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(self.path, limit=STREAM_LIMIT)
        except OSError as exc:
            raise Unavailable("cannot connect", transport=repr(self), error=exc.strerror or str(exc)) from exc

    async def listen(self, handle: ConnectionHandler) -> Listener:
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(self.path))
            os.chmod(self.path, self.mode)
            inode = self.path.stat().st_ino
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise

        def unlink() -> None:
            # Only remove the socket if it is still ours (not replaced by a newer server).
            with contextlib.suppress(OSError):
                if self.path.stat().st_ino == inode:
                    self.path.unlink()

        return _AcceptLoop(sock, handle, repr(self), unlink)

    def _remove_stale_socket(self) -> None:
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise errors.AlreadyExists("path exists and is not a socket", path=str(self.path))
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(self.path))
        except ConnectionRefusedError:
            self.path.unlink(missing_ok=True)  # left behind by a server that died
            return
        except OSError:
            return
        finally:
            probe.close()
        raise errors.AlreadyExists("a server is already listening", path=str(self.path))


class ListeningSocketTransport(Transport):
    """A unix socket already bound and listening (inherited from a parent, as a shim's ``start``
    hands it to the long-lived shim): serve it; ``path`` is removed when the listener closes."""

    def __init__(self, sock: socket.socket, path: str | os.PathLike[str] | None = None) -> None:
        self.sock = sock
        self.path = Path(path) if path is not None else None

    def __repr__(self) -> str:
        return f"unix:{self.path or self.sock.fileno()}"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise errors.InvalidArgument("a listening socket cannot connect", transport=repr(self))

    async def listen(self, handle: ConnectionHandler) -> Listener:
        self.sock.setblocking(False)
        path = self.path

        def unlink() -> None:
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()

        return _AcceptLoop(self.sock, handle, repr(self), unlink)


class VsockTransport(Transport):
    """AF_VSOCK ``(cid, port)``: connect to a VM's agent, or listen on ``VMADDR_CID_ANY`` in the guest."""

    def __init__(self, cid: int, port: int) -> None:
        if not 0 <= cid <= 0xFFFFFFFF:
            raise errors.InvalidArgument("vsock cid out of range", field="cid", value=cid)
        if not 0 <= port <= 0xFFFFFFFF:
            raise errors.InvalidArgument("vsock port out of range", field="port", value=port)
        self.cid = cid
        self.port = port

    def __repr__(self) -> str:
        return f"vsock:{self.cid}:{self.port}"

    @staticmethod
    def _new_socket() -> socket.socket:
        return socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)

    def _socket(self) -> socket.socket:
        try:
            sock = self._new_socket()
        except (AttributeError, OSError) as exc:
            raise Unavailable("vsock is not available", transport=repr(self), error=str(exc)) from exc
        sock.setblocking(False)
        return sock

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = self._socket()
        try:
            await asyncio.get_running_loop().sock_connect(sock, (self.cid, self.port))
        except OSError as exc:
            sock.close()
            raise Unavailable("cannot connect", transport=repr(self), error=exc.strerror or str(exc)) from exc
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=STREAM_LIMIT)

    async def listen(self, handle: ConnectionHandler) -> Listener:
        sock = self._socket()
        try:
            sock.bind((self.cid, self.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise Unavailable("cannot listen", transport=repr(self), error=exc.strerror or str(exc)) from exc
        return _AcceptLoop(sock, handle, repr(self))
