"""Per-process stdio in the guest: three pipes, or a pty master. Standard library only.

The host pulls output with ReadStdout/ReadStderr and pushes input with WriteStdin; nothing
is streamed without being asked for. Each output stream is an :class:`OutputBuffer` fed by
``loop.add_reader`` on the agent's end of the pipe (or the pty master):

* **Flow control.** While a buffer holds more than :data:`HIGH_WATER` bytes the agent stops
  reading the fd; the pipe (64 KiB) or the pty fills up and the container blocks in write(2)
  instead of the agent's memory growing. Reading resumes as soon as the host took data.
* **No byte lost at exit.** EOF is reported (``read`` returns ``b""``) only once the fd itself
  reported it and every byte before it was handed out: a pipe gives EOF after its last data,
  and a pty master keeps the slave's last output readable until it fails with EIO.
* :meth:`OutputBuffer.wait_drained` is what WaitProcess waits for after the process exited, so
  the exit status never overtakes output (the host must read both streams to EOF, or remove the
  container, which closes the buffers).

In terminal mode (``process.terminal``) crun hands the pty master over ``--console-socket``
(:func:`receive_pty_master`); stdout and stdin both use it, stderr is merged into it by the
terminal and reads as an immediate EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct
import termios
from dataclasses import dataclass

from cocoon.errors import ProcessError, StateError
from cocoon.log import get_logger

log = get_logger("agent")

HIGH_WATER = 1 << 20  # bytes buffered per stream before the agent stops reading the fd
READ_CHUNK = 65536
MAX_READ = 1 << 20  # most bytes one ReadStdout/ReadStderr answer carries


class OutputBuffer:
    """One output stream of a process: bytes read from ``fd``, handed out by :meth:`read`.

    ``fd`` must be non-blocking. With ``owns_fd`` the buffer closes it at EOF or :meth:`close`;
    a pty master (also used for stdin) is owned by :class:`ProcessIO` instead.
    """

    def __init__(self, fd: int | None, *, name: str, owns_fd: bool = True, limit: int = HIGH_WATER) -> None:
        self.name = name
        self.limit = limit
        self._fd = fd
        self._owns_fd = owns_fd
        self._buf = bytearray()
        self._eof = fd is None
        self._closed = False
        self._reading = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        self._drained = asyncio.Event()
        self.total = 0  # bytes read from the fd so far
        if self._eof:
            self._changed.set()
            self._drained.set()

    def start(self) -> None:
        """Start reading the fd in the running loop."""
        self._loop = asyncio.get_running_loop()
        self._resume()

    @property
    def eof(self) -> bool:
        """The fd reported end of file (buffered bytes may still be waiting)."""
        return self._eof

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def paused(self) -> bool:
        """Reading stopped because the buffer is over its limit."""
        return not self._eof and not self._reading and self._loop is not None

    def _resume(self) -> None:
        if self._eof or self._reading or self._fd is None or self._loop is None:
            return
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True

    def _pause(self) -> None:
        if self._reading and self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._reading = False

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # EIO: a pty master whose slave side is closed everywhere: the terminal's EOF.
            if exc.errno != errno.EIO:
                log.warning("stdio read failed", stream=self.name, error=str(exc))
            data = b""
        if not data:
            self._end()
            return
        self._buf += data
        self.total += len(data)
        self._changed.set()
        if len(self._buf) > self.limit:
            self._pause()

    def _end(self) -> None:
        self._pause()
        self._eof = True
        if self._owns_fd and self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._changed.set()
        if not self._buf:
            self._drained.set()

    async def read(self, n: int = READ_CHUNK) -> bytes:
        """Up to ``n`` bytes, waiting until there are some; ``b""`` means end of stream."""
        n = max(1, min(n, MAX_READ))
        while not self._buf and not self._eof:
            self._changed.clear()
            await self._changed.wait()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        if not self._buf:
            if self._eof:
                self._drained.set()
            else:
                self._changed.clear()
        if len(self._buf) <= self.limit:
            self._resume()
        return data

    async def wait_drained(self) -> None:
        """Until end of file was reached and every byte read (or the buffer closed)."""
        await self._drained.wait()

    @property
    def drained(self) -> bool:
        return self._drained.is_set()

    def close(self) -> None:
        """Stop reading and drop what is buffered; readers get end of stream."""
        if self._closed:
            return
        self._closed = True
        self._buf.clear()
        if not self._eof:
            self._end()
        self._drained.set()
        self._changed.set()


@dataclass(frozen=True)
class ChildFds:
    """The container's ends of its stdio pipes (crun passes them on to the process)."""

    stdin: int
    stdout: int
    stderr: int

    def close(self) -> None:
        for fd in (self.stdin, self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                os.close(fd)


class ProcessIO:
    """stdin, stdout and stderr of one container process, as the agent sees them."""

    def __init__(self, *, stdin: int | None, stdout: OutputBuffer, stderr: OutputBuffer,
                 terminal: int | None = None) -> None:
        self._stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._master = terminal
        self._write_lock = asyncio.Lock()
        self._stdin_closed = False

    @classmethod
    def pipes(cls) -> tuple[ProcessIO, ChildFds]:
        """Three pipes; returns the agent's side and the child's ends (close them once spawned)."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (in_w, out_r, err_r):
            os.set_blocking(fd, False)
        io = cls(stdin=in_w, stdout=OutputBuffer(out_r, name="stdout"), stderr=OutputBuffer(err_r, name="stderr"))
        return io, ChildFds(in_r, out_w, err_w)

    @classmethod
    def terminal(cls, master: int) -> ProcessIO:
        """A pty master: stdin and stdout; stderr is merged by the terminal (empty here)."""
        os.set_blocking(master, False)
        return cls(stdin=None, stdout=OutputBuffer(master, name="tty", owns_fd=False),
                   stderr=OutputBuffer(None, name="stderr"), terminal=master)

    @property
    def is_terminal(self) -> bool:
        return self._master is not None

    def start(self) -> None:
        """Start reading output (in the running loop)."""
        self.stdout.start()
        self.stderr.start()

    async def write(self, data: bytes) -> int:
        """Write all of ``data`` to stdin, waiting while the pipe is full; returns len(data)."""
        fd = self._master if self._master is not None else self._stdin
        if self._stdin_closed or fd is None:
            raise StateError("stdin is closed", state="stdin-closed")
        loop = asyncio.get_running_loop()
        async with self._write_lock:
            view = memoryview(data)
            while view:
                if self._stdin_closed:
                    raise StateError("stdin closed while writing", state="stdin-closed")
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    await wait_writable(loop, fd)
                    continue
                except BrokenPipeError as exc:
                    raise StateError("the process closed its stdin", state="stdin-closed") from exc
                except OSError as exc:
                    if exc.errno == errno.EIO:  # the terminal is gone
                        raise StateError("the process closed its terminal", state="exited") from exc
                    raise ProcessError(f"write to stdin: {exc.strerror}", errno=exc.errno) from exc
                view = view[n:]
        return len(data)

    def close_stdin(self) -> None:
        """End of input. A pipe is closed; a terminal gets its EOF character (^D) instead,
        since closing the master would hang the process up. Idempotent."""
        if self._stdin_closed:
            return
        self._stdin_closed = True
        if self._master is not None:
            with contextlib.suppress(OSError):
                eof = termios.tcgetattr(self._master)[6][termios.VEOF]
                os.write(self._master, eof if isinstance(eof, bytes) else bytes([eof]))
        elif self._stdin is not None:
            os.close(self._stdin)
            self._stdin = None

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's window size (TIOCSWINSZ); the process gets SIGWINCH."""
        if self._master is None:
            raise StateError("process has no terminal", state="no-terminal")
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    async def wait_drained(self) -> None:
        """Until both output streams reached end of file and were read (or closed)."""
        await self.stdout.wait_drained()
        await self.stderr.wait_drained()

    def close(self) -> None:
        """Release every fd; pending reads return end of stream."""
        self.stdout.close()
        self.stderr.close()
        self._stdin_closed = True
        for fd in (self._stdin, self._master):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._stdin = self._master = None


async def wait_writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Until ``fd`` (non-blocking) can take a write."""
    ready = loop.create_future()

    def on_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, on_ready)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


def console_socket(path: str) -> socket.socket:
    """A listening unix socket for crun's ``--console-socket`` (non-blocking)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def receive_pty_master(sock: socket.socket, timeout: float = 10.0) -> int:
    """Accept crun's connection on ``sock`` and take the pty master fd it sends (SCM_RIGHTS)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            conn, _ = await loop.sock_accept(sock)
    except TimeoutError:
        raise ProcessError("crun sent no terminal on the console socket", timeout=timeout) from None
    with conn:
        conn.setblocking(True)
        conn.settimeout(timeout)
        _, fds, _, _ = socket.recv_fds(conn, 4096, 4)
    if not fds:
        raise ProcessError("console socket message carried no fd")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


def winsize(fd: int) -> tuple[int, int]:
    """(rows, cols) of a terminal."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, cols
