"""A process's stdio between containerd's fifos and the guest (through :class:`cocoon.api.sandbox.Process`).

containerd (ctr, CRI) makes a fifo per stream and opens its own end before ``Create``/``Exec``.
Output: the relay pulls the guest's stdout/stderr to end of stream and writes it to the fifo;
:meth:`ProcessIO.drained` answers once every byte has been written (or the reader went away), so
the shim reports an exit only after the output is complete. Input: bytes read from the stdin fifo
are written to the process; the writer closing it (or ``CloseIO``) closes the process's stdin.

Opening never blocks: an output fifo without a reader yet is opened read-write (our own read end
keeps the bytes for the reader that comes); stdin is opened non-blocking and read only when epoll
says it is readable, which a fifo no writer opened yet never is.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Awaitable, Callable
from typing import Protocol

from cocoon.errors import CocoonError, NotFound, StateError
from cocoon.log import get_logger

log = get_logger("shim")

READ_SIZE = 65536


class GuestProcess(Protocol):
    """What the relay needs of a :class:`cocoon.api.sandbox.Process`."""

    async def read_stdout(self, n: int = ...) -> bytes: ...
    async def read_stderr(self, n: int = ...) -> bytes: ...
    async def write_stdin(self, data: bytes) -> int: ...
    async def close_stdin(self) -> None: ...


def open_output(path: str) -> int:
    """A non-blocking write fd on the fifo (or file) ``path``."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: a fifo with no reader yet
            raise
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


async def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to the non-blocking ``fd``, waiting while the pipe is full."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_writer(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_writer(fd)
            continue
        view = view[n:]


async def read_some(fd: int) -> bytes:
    """Up to :data:`READ_SIZE` bytes from the non-blocking ``fd`` once epoll says it is readable; b"" at EOF."""
    loop = asyncio.get_running_loop()
    while True:
        # Wait first: read(2) on a fifo no writer has opened yet says EOF; epoll does not say readable.
        ready = loop.create_future()
        loop.add_reader(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        try:
            return os.read(fd, READ_SIZE)
        except BlockingIOError:
            continue


class ProcessIO:
    """The relays of one process; ``stdin``/``stdout``/``stderr`` are containerd's paths ("" for none)."""

    def __init__(self, name: str, stdin: str, stdout: str, stderr: str, *, terminal: bool) -> None:
        self.name = name
        self.paths = (stdin, stdout, stderr)
        self.terminal = terminal
        self._fds: list[int] = []  # every fd opened, to close
        self._out_fds: list[int] = []  # stdout, stderr: -1 for a stream nobody reads
        self._in_fd = -1
        self._out: list[asyncio.Task[None]] = []
        self._in: asyncio.Task[None] | None = None
        self._process: GuestProcess | None = None

    def open(self) -> None:
        """Open the fifos (before the process starts: a failure leaves nothing open)."""
        stdin, stdout, stderr = self.paths
        try:
            if stdin:
                self._in_fd = os.open(stdin, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self._fds.append(self._in_fd)
            for path in (stdout, "" if self.terminal else stderr):
                fd = open_output(path) if path else -1
                self._out_fds.append(fd)
                if fd >= 0:
                    self._fds.append(fd)
        except OSError as exc:
            self.close()
            raise NotFound(f"cannot open stdio: {exc.strerror}", process=self.name,
                           path=exc.filename or "") from exc  # fmt: skip

    def attach(self, process: GuestProcess) -> None:
        """Start relaying for ``process`` (it exists in the guest now)."""
        self._process = process
        loop = asyncio.get_running_loop()
        readers: list[Callable[[], Awaitable[bytes]]] = [process.read_stdout, process.read_stderr]
        # A stream nobody asked for (fd -1, or stderr of a terminal) is drained all the same.
        for fd, read in zip(self._out_fds or [-1, -1], readers, strict=True):
            self._out.append(loop.create_task(self._pump_out(read, fd), name=f"stdout/err {self.name}"))
        if self._in_fd >= 0:
            self._in = loop.create_task(self._pump_in(process, self._in_fd), name=f"stdin {self.name}")

    async def _pump_out(self, read: Callable[[], Awaitable[bytes]], fd: int) -> None:
        broken = fd < 0
        while True:
            try:
                data = await read()
            except (StateError, NotFound):
                return  # container removed: end of stream
            except CocoonError as exc:
                log.warning("output relay stopped", process=self.name, error=str(exc))
                return
            if not data:
                return
            if broken:
                continue  # keep draining: a process must not block on a full pipe nobody reads
            try:
                await write_all(fd, data)
            except OSError as exc:
                broken = True
                log.debug("output reader went away", process=self.name, error=exc.strerror)

    async def _pump_in(self, process: GuestProcess, fd: int) -> None:
        try:
            while data := await read_some(fd):
                await process.write_stdin(data)
            await process.close_stdin()
        except (StateError, NotFound):
            pass
        except (CocoonError, OSError) as exc:
            log.debug("stdin relay stopped", process=self.name, error=str(exc))

    async def close_stdin(self) -> None:
        """containerd's CloseIO: no more input."""
        if self._in is not None:
            self._in.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._in
            self._in = None
        if self._process is not None:
            with contextlib.suppress(StateError, NotFound):
                await self._process.close_stdin()

    async def drained(self) -> None:
        """Wait until the output was relayed to the end."""
        if self._out:
            await asyncio.gather(*self._out, return_exceptions=True)

    def close(self) -> None:
        """Stop relaying and close every fd (idempotent)."""
        for task in [*self._out, *([self._in] if self._in else [])]:
            task.cancel()
        self._out, self._in = [], None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds, self._out_fds, self._in_fd = [], [], -1
