"""Child processes of the agent: one SIGCHLD handler reaps them all. Standard library only.

In the guest the agent is PID 1, so every orphan (a container's init once ``crun create``
exits, a detached ``crun exec`` process, their daemonized descendants) becomes its child and
must be reaped by it. :class:`Reaper` owns that duty: on SIGCHLD it loops ``waitpid(-1,
WNOHANG)`` and resolves the future of each pid someone waits for. The last statuses are
remembered by pid, so a process that exits before anybody asked about it (a container process
whose pid is only learnt from crun's pid file) still gets its status to whoever asks next.

Because ``waitpid(-1)`` takes every child, nothing else in the agent may wait for children:
no ``asyncio.create_subprocess_*`` and no ``subprocess.Popen.wait``. Commands are started with
:meth:`Reaper.spawn` (``posix_spawn``) and awaited with :meth:`Reaper.wait` or :meth:`Reaper.run`.

Exit statuses are shell style: the exit code, or ``128 + signal`` for a process killed by a
signal (SIGKILL -> 137, SIGTERM -> 143).

On a host (tests) the same code works for the children of the process; ``subreaper=True``
also adopts orphaned descendants (``PR_SET_CHILD_SUBREAPER``), as PID 1 does in the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from cocoon.agent.stdio import wait_writable
from cocoon.errors import NotFound, ProcessError, StateError
from cocoon.log import get_logger

log = get_logger("agent")

PR_SET_CHILD_SUBREAPER = 36
# Exit statuses remembered by pid; the oldest are dropped beyond this (orphans of orphans pile up).
MAX_STATUSES = 4096
DEFAULT_ENV: Mapping[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
# Python ignores these; a child must start with the default action, as after a shell.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
_READ_CHUNK = 65536


def shell_status(waitstatus: int) -> int:
    """A raw wait status -> exit code, or 128 + signal number for a signal death."""
    code = os.waitstatus_to_exitcode(waitstatus)
    return code if code >= 0 else 128 - code


def set_subreaper(on: bool = True) -> None:
    """Make this process adopt its orphaned descendants (prctl PR_SET_CHILD_SUBREAPER)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise ProcessError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}", errno=err)


class Reaper:
    """Reaps every child of this process and hands out exit statuses by pid."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._statuses: OrderedDict[int, int] = OrderedDict()  # recent exits, newest last
        self._subreaper = False

    # ---- life cycle

    def install(self, *, subreaper: bool = False) -> None:
        """Take over SIGCHLD in the running loop; reap whatever already exited."""
        if self._loop is not None:
            raise StateError("reaper already installed", state="installed", required="new")
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self._loop = loop
        if subreaper:
            set_subreaper(True)
            self._subreaper = True
        self.reap()

    def close(self) -> None:
        """Give SIGCHLD back; pending waits fail with StateError."""
        if self._loop is None:
            return
        self.reap()
        self._loop.remove_signal_handler(signal.SIGCHLD)
        if self._subreaper:
            with contextlib.suppress(ProcessError):
                set_subreaper(False)
            self._subreaper = False
        for pid, fut in self._waiting.items():
            if not fut.done():
                fut.set_exception(StateError("reaper closed while waiting", pid=pid, state="closed"))
        self._waiting.clear()
        self._loop = None

    @property
    def installed(self) -> bool:
        return self._loop is not None

    # ---- reaping

    def reap(self) -> int:
        """Collect every exited child now (the SIGCHLD handler); returns how many."""
        count = 0
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
                continue
            if pid == 0:
                break
            count += 1
            self._exited(pid, shell_status(status))
        return count

    def _exited(self, pid: int, status: int) -> None:
        # Kept even when someone waits: a later watch() of the same pid gets the same answer.
        self._statuses[pid] = status
        self._statuses.move_to_end(pid)
        while len(self._statuses) > MAX_STATUSES:
            self._statuses.popitem(last=False)
        fut = self._waiting.pop(pid, None)
        if fut is not None and not fut.done():
            fut.set_result(status)

    def watch(self, pid: int) -> asyncio.Future[int]:
        """The future of ``pid``'s exit status.

        A status remembered from before the call (a process that exited before anybody asked,
        like a container's init learnt from crun's pid file) resolves it at once, unless ``pid``
        is alive again: then the remembered status belonged to an earlier process.
        """
        fut = self._waiting.get(pid)
        if fut is not None:
            return fut
        loop = self._loop or asyncio.get_running_loop()
        fut = loop.create_future()
        status = self._statuses.get(pid)
        if status is not None:
            if not os.path.exists(f"/proc/{pid}"):
                fut.set_result(status)
                return fut
            del self._statuses[pid]  # the pid was reused by a live process
        self._waiting[pid] = fut
        if self._loop is not None:
            self.reap()  # it may have exited between the last SIGCHLD and now
        return fut

    async def wait(self, pid: int, timeout: float | None = None) -> int:
        """Wait for ``pid`` to exit; its shell-style status. TimeoutError after ``timeout``."""
        fut = self.watch(pid)
        if timeout is None:
            return await asyncio.shield(fut)
        async with asyncio.timeout(timeout):
            return await asyncio.shield(fut)

    def forget(self, pid: int) -> None:
        """Stop waiting for ``pid`` (its status, when it comes, is still remembered)."""
        fut = self._waiting.pop(pid, None)
        if fut is not None and not fut.done():
            fut.cancel()

    # ---- starting processes

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> int:
        """Start ``argv`` with ``posix_spawn``; returns its pid, already watched.

        ``stdin``/``stdout``/``stderr`` are fds dup'ed to 0/1/2 in the child (None: /dev/null).
        Every other fd of the agent is close-on-exec, so the child gets only these three. The
        environment is ``env`` or a bare PATH: nothing of the agent's is inherited.
        """
        if not self.installed:
            raise StateError("reaper not installed", state="new", required="installed")
        if not argv:
            raise ProcessError("empty command")
        actions: list[tuple[Any, ...]] = []
        for target, fd, mode in ((0, stdin, os.O_RDONLY), (1, stdout, os.O_WRONLY), (2, stderr, os.O_WRONLY)):
            if fd is None:
                actions.append((os.POSIX_SPAWN_OPEN, target, os.devnull, mode, 0))
            else:
                actions.append((os.POSIX_SPAWN_DUP2, fd, target))
        cmd_env = dict(env if env is not None else DEFAULT_ENV)
        try:
            path = argv[0] if "/" in argv[0] else _which(argv[0], cmd_env.get("PATH", ""))
            with _working_directory(cwd):
                pid = os.posix_spawn(path, list(argv), cmd_env, file_actions=actions,
                                     setsigdef=_RESET_SIGNALS, setsigmask=())
        except FileNotFoundError as exc:
            raise NotFound("command not found", command=argv[0]) from exc
        except OSError as exc:
            raise ProcessError(f"cannot start command: {exc.strerror}", command=" ".join(argv),
                               errno=exc.errno) from exc
        # A pid handed out by the kernel just now is not the one of any remembered status.
        self._statuses.pop(pid, None)
        self.watch(pid)
        log.debug("spawn", command=" ".join(argv), child=pid)
        return pid

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = 60.0,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> tuple[int, bytes, bytes]:
        """Run a short command to completion: ``(status, stdout, stderr)``.

        Output is captured through pipes unless an fd is given for it. Once the command exited
        what is in the pipes is taken without waiting for EOF: a descendant it left behind
        (a container holding the same pipe) must not keep the caller waiting. After ``timeout``
        the command is killed and ProcessError raised.
        """
        loop = asyncio.get_running_loop()
        own: list[int] = []  # parent ends, closed at the end
        child: list[int] = []  # child ends, closed once spawned
        try:
            in_fd = stdin
            if input is not None:
                r, w = os.pipe()
                own.append(w)
                child.append(r)
                in_fd = r
            captures: dict[str, tuple[int, bytearray]] = {}
            fds: dict[str, int | None] = {"stdout": stdout, "stderr": stderr}
            for name in ("stdout", "stderr"):
                if fds[name] is None:
                    r, w = os.pipe()
                    own.append(r)
                    child.append(w)
                    os.set_blocking(r, False)
                    captures[name] = (r, bytearray())
                    fds[name] = w
            pid = self.spawn(argv, stdin=in_fd, stdout=fds["stdout"], stderr=fds["stderr"], env=env, cwd=cwd)
            for fd in child:
                os.close(fd)
            child.clear()
            for fd, buf in captures.values():
                loop.add_reader(fd, _drain, fd, buf)
            if input is not None:
                await _write_all(loop, own[0], input)
                os.close(own.pop(0))
            started = time.monotonic()
            try:
                status = await self.wait(pid, timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                await self.wait(pid)
                raise ProcessError("command timed out", command=" ".join(argv), timeout=timeout) from None
            for fd, buf in captures.values():
                loop.remove_reader(fd)
                _drain(fd, buf)
            log.debug("ran", command=" ".join(argv), status=status, ms=round((time.monotonic() - started) * 1000))
            out = captures["stdout"][1] if "stdout" in captures else b""
            err = captures["stderr"][1] if "stderr" in captures else b""
            return status, bytes(out), bytes(err)
        finally:
            for fd in own + child:
                with contextlib.suppress(OSError):
                    loop.remove_reader(fd)
                    os.close(fd)


def _which(name: str, path: str) -> str:
    for d in path.split(os.pathsep):
        candidate = os.path.join(d or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(errno.ENOENT, "not found", name)


@contextlib.contextmanager
def _working_directory(cwd: str | None) -> Iterator[None]:
    # posix_spawn in Python 3.11 has no chdir action and the child inherits our directory:
    # change it around the (synchronous) spawn. Nothing else runs on the loop meanwhile.
    if cwd is None:
        yield
        return
    old = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.chdir(cwd)
        except OSError as exc:
            raise ProcessError(f"bad working directory: {exc.strerror}", cwd=cwd) from exc
        yield
    finally:
        os.fchdir(old)
        os.close(old)


def _drain(fd: int, buf: bytearray) -> None:
    """Read what a non-blocking pipe holds now."""
    while True:
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            return
        if not data:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(fd)
            return
        buf += data


async def _write_all(loop: asyncio.AbstractEventLoop, fd: int, data: bytes) -> None:
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await wait_writable(loop, fd)
            continue
        except BrokenPipeError:
            return  # the command does not read its input: not our failure
        view = view[n:]
