"""Every host subprocess goes through here: argv lists, explicit env, stdin closed, logged.

``run()`` runs a command to completion and raises :class:`ProcessError` (with the
command, exit code and stderr tail) on failure. ``spawn()`` starts a long-lived
helper as a context manager that kills and reaps it on exit, so a failure half-way
never leaves a process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

from cocoon.errors import NotFound, ProcessError
from cocoon.log import get_logger

log = get_logger("cocoon")

# The environment a helper gets unless the caller passes one: nothing inherited but PATH.
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


def _env(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(BASE_ENV)
    if env:
        merged.update(env)
    return merged


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    timeout: float | None = 60.0,
    check: bool = True,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion, capturing output; raise ProcessError on failure if ``check``."""
    args = [os.fspath(a) for a in argv]
    log.debug("run", command=" ".join(args))
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            env=_env(env),
            timeout=timeout,
            check=False,
            cwd=cwd,
        )
    except FileNotFoundError as exc:
        raise NotFound("command not found", command=args[0]) from exc
    except subprocess.TimeoutExpired as exc:
        raise ProcessError("command timed out", command=" ".join(args), timeout=timeout) from exc
    if check and proc.returncode != 0:
        raise ProcessError(
            "command failed",
            command=" ".join(args),
            exit_code=proc.returncode,
            stderr=proc.stderr.decode(errors="replace").strip()[-400:],
        )
    return proc


def terminate(proc: subprocess.Popen[Any], *, grace: float = 2.0) -> int:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL; always reaps. Returns the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode


def popen(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    pass_fds: Sequence[int] = (),
    new_session: bool = True,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a process the caller owns (it must :func:`terminate` it); prefer :func:`spawn`.

    ``die_with_parent``: the kernel SIGKILLs the child when this process dies, even by SIGKILL
    (PR_SET_PDEATHSIG), so a VMM never outlives the process that owns it.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("spawn", command=" ".join(args))
    try:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=_env(env),
            pass_fds=tuple(pass_fds),
            start_new_session=new_session,
            preexec_fn=_die_with_parent if die_with_parent else None,  # noqa: PLW1509 - one prctl
        )
    except FileNotFoundError as exc:
        raise NotFound("command not found", command=args[0]) from exc
    except PermissionError as exc:
        raise ProcessError("command not executable", command=args[0]) from exc


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


async def wait_exit(proc: subprocess.Popen[Any], timeout: float | None = None) -> int | None:
    """Wait without blocking the event loop (pidfd); the exit status, or None on timeout."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return proc.wait()
    loop = asyncio.get_running_loop()
    exited = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        await asyncio.wait_for(exited, timeout)
    except TimeoutError:
        return proc.poll()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return proc.wait()


@contextlib.contextmanager
def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    pass_fds: Sequence[int] = (),
    grace: float = 2.0,
    new_session: bool = True,
    die_with_parent: bool = True,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a helper process owned by this context: it is terminated and reaped on exit (and
    killed by the kernel if this process dies first)."""
    proc = popen(argv, env=env, stdout=stdout, stderr=stderr, pass_fds=pass_fds, new_session=new_session,
                 die_with_parent=die_with_parent)
    try:
        yield proc
    finally:
        terminate(proc, grace=grace)


def wait_for(predicate: Any, *, timeout: float, interval: float = 0.005, what: str = "condition") -> None:
    """Poll ``predicate()`` until true; raise ProcessError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise ProcessError(f"timed out waiting for {what}", timeout=timeout)
        time.sleep(interval)
