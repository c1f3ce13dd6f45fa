"""Relaying a guest process's stdio to host file descriptors (pipes, fifos, files or a pty).

Host fds may be anything a runc client hands over, so blocking I/O is done off the event
loop: writes through the default executor (they always finish), stdin reads on a daemon
thread (a read that never returns must not keep the process alive). Output is relayed
until the agent reports EOF, so no byte written before the process exited is lost.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import termios
import threading
from typing import Any

from cocoon.errors import AgentError, InvalidArgument
from cocoon.log import get_logger

log = get_logger("api")

CHUNK = 64 * 1024
# What a runc stand-in passes on to the process it stands for (SIGKILL/SIGSTOP cannot be caught).
FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


async def _write_all(fd: int, data: bytes) -> bool:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            n = await loop.run_in_executor(None, os.write, fd, view)
        except OSError as exc:  # the reader went away: stop relaying, keep the process running
            log.debug("stdio write failed", fd=fd, error=exc.strerror)
            return False
        view = view[n:]
    return True


async def pump_output(agent: Any, container_id: str, exec_id: str, fd: int, *, stderr: bool = False) -> None:
    """Copy the guest's stdout (or stderr) to ``fd`` until EOF."""
    read = agent.read_stderr if stderr else agent.read_stdout
    alive = True
    while True:
        try:
            data = await read(container_id, exec_id, CHUNK)
        except AgentError as exc:
            log.debug("output stream ended", error=str(exc), stderr=stderr)
            return
        if not data:
            return
        if alive:
            alive = await _write_all(fd, data)


def _reader_thread(fd: int, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, CHUNK)
        except OSError:
            data = b""
        loop.call_soon_threadsafe(queue.put_nowait, data)
        if not data:
            return


async def pump_input(agent: Any, container_id: str, exec_id: str, fd: int, *, close_at_eof: bool = True) -> None:
    """Copy ``fd`` to the guest process's stdin; close its stdin at EOF."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    threading.Thread(target=_reader_thread, args=(fd, loop, queue), daemon=True, name=f"stdin-{fd}").start()
    try:
        while True:
            data = await queue.get()
            if not data:
                break
            await agent.write_stdin(container_id, exec_id, data)
        if close_at_eof:
            await agent.close_stdin(container_id, exec_id)
    except AgentError as exc:
        log.debug("input stream ended", error=str(exc))


def stdin_is_null(fd: int = 0) -> bool:
    """True when ``fd`` is /dev/null or closed (nothing will ever be read)."""
    try:
        st = os.fstat(fd)
        null = os.stat("/dev/null")
    except OSError:
        return True
    return (st.st_rdev, st.st_ino) == (null.st_rdev, null.st_ino)


def send_console(console_socket: str, master_fd: int) -> None:
    """Hand the pty master to the runc client listening on ``console_socket`` (SCM_RIGHTS), as runc does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(console_socket)
        except OSError as exc:
            raise InvalidArgument(
                f"cannot connect to console socket: {exc.strerror}", field="console-socket", path=console_socket
            ) from exc
        name = os.ttyname(master_fd) if os.isatty(master_fd) else "/dev/ptmx"
        sock.sendmsg([name.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [master_fd]).tobytes())])


def open_console(console_socket: str, rows: int = 0, cols: int = 0) -> int:
    """Make a host pty, send its master over ``console_socket``, return the slave (our end).

    The slave becomes this process's controlling terminal (the caller is a session leader), so
    the client resizing the master raises SIGWINCH here and :func:`window_size` reads the new size.
    """
    master, slave = os.openpty()
    try:
        import tty

        tty.setraw(slave)  # the guest's pty does the line discipline; ours must pass bytes through
        if rows and cols:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        with contextlib.suppress(OSError):
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        send_console(console_socket, master)
    except BaseException:
        os.close(slave)
        raise
    finally:
        os.close(master)
    return slave


def detach_stdio() -> None:
    """Point fds 0-2 at /dev/null. With a console socket the terminal is the container's stdio, and
    the client (go-runc in containerd's shim) reads create's stdout/stderr pipes until EOF: holding
    them would block its create forever."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1, 2):
            os.dup2(null, fd)
    finally:
        os.close(null)


def window_size(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols


class ProcessIO:
    """The host end of one guest process's stdio (init or exec), and its window size.

    With a terminal and a console socket, a host pty's master goes to the client and the
    slave is relayed to the guest pty; otherwise this process's own fds 0/1/2 are relayed.
    """

    def __init__(self, agent: Any, container_id: str, exec_id: str) -> None:
        self.agent = agent
        self.cid = container_id
        self.eid = exec_id
        self.console_fd: int | None = None
        self.pumps: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def start(self, *, terminal: bool, console_socket: str | None, rows: int = 0, cols: int = 0) -> None:
        if terminal and console_socket:
            self.console_fd = open_console(console_socket, rows, cols)
            in_fd = out_fd = self.console_fd
            detach_stdio()
            import signal

            asyncio.get_running_loop().add_signal_handler(signal.SIGWINCH, self._on_winch)
        else:
            in_fd, out_fd = 0, 1
        self.pumps.append(asyncio.create_task(pump_output(self.agent, self.cid, self.eid, out_fd)))
        if not terminal:
            self.pumps.append(asyncio.create_task(pump_output(self.agent, self.cid, self.eid, 2, stderr=True)))
        if stdin_is_null(in_fd):
            if not terminal:
                await self.agent.close_stdin(self.cid, self.eid)
        else:
            # Not awaited at exit: input may never reach EOF.
            self._spawn(pump_input(self.agent, self.cid, self.eid, in_fd, close_at_eof=not terminal))

    def forward_signals(self) -> None:
        """Pass the signals this host process receives on to the guest process it stands for."""
        import signal

        loop = asyncio.get_running_loop()
        for name in FORWARDED_SIGNALS:
            sig = int(getattr(signal, name))
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        self._spawn(self._signal(sig))

    async def _signal(self, sig: int) -> None:
        try:
            await self.agent.signal_process(self.cid, self.eid, sig)
        except AgentError as exc:  # the process may be gone already
            log.warning("cannot forward signal", signal=sig, error=str(exc))

    def _on_winch(self) -> None:
        if self.console_fd is not None:
            rows, cols = window_size(self.console_fd)
            self._spawn(self._resize(rows, cols))

    async def _resize(self, rows: int, cols: int) -> None:
        with contextlib.suppress(AgentError):
            await self.agent.tty_win_resize(self.cid, self.eid, rows, cols)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for the output relays to reach EOF (everything the process wrote is delivered)."""
        if self.pumps:
            await asyncio.wait(self.pumps, timeout=timeout)
        for task in self.pumps:
            task.cancel()
