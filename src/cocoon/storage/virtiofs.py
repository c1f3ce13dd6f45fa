"""virtiofsd: a host directory exported to one VM over a vhost-user socket.

    with VirtioFsDaemon(rootfs_dir, workdir / "vfs0.sock", tag="rootfs") as share:
        spec = VMSpec(..., shared_dirs=(share,))       # QEMU adds vhost-user-fs-device
        ...                                            # in the guest: mount -t virtiofs rootfs /mnt

The daemon is QEMU 7.2's C virtiofsd (``/usr/lib/qemu/virtiofsd``). It serves exactly one
vhost-user connection and exits when the VMM disconnects. It runs in a process group of its
own: in its default ``sandbox=namespace`` mode it forks a child in new namespaces, and
leaving the context kills the whole group (SIGTERM, then SIGKILL after ``grace``), reaps the
daemon and removes the socket, whatever happened inside.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Literal

from cocoon.errors import InvalidArgument, NotFound, ProcessError
from cocoon.hypervisors.base import SharedDir
from cocoon.log import get_logger
from cocoon.util.proc import spawn

log = get_logger("storage")

DEFAULT_BINARY = "/usr/lib/qemu/virtiofsd"
MAX_TAG_LEN = 36  # virtio-fs config space: tag[36]
READY_TIMEOUT = 10.0

CacheMode = Literal["auto", "always", "none"]


def daemon_argv(binary: str, shared_dir: Path, socket_path: Path, *, cache: CacheMode = "auto",
                sandbox: Literal["namespace", "chroot"] = "namespace", xattr: bool = False) -> list[str]:
    """virtiofsd's command line (pure; tested without the daemon)."""
    argv = [
        binary,
        f"--socket-path={socket_path}",
        "-o", f"source={shared_dir}",
        "-o", f"cache={cache}",
        "-o", f"sandbox={sandbox}",
        # The default raises RLIMIT_NOFILE towards 1M, which needs CAP_SYS_RESOURCE that some
        # hosts (nested sandboxes) lack: keep the limit the daemon was given.
        "--rlimit-nofile=0",
    ]  # fmt: skip
    if xattr:
        argv += ["-o", "xattr"]
    return argv


def check_tag(tag: str) -> str:
    if not tag or len(tag.encode()) > MAX_TAG_LEN or any(c in tag for c in ",= \0"):
        raise InvalidArgument("bad virtio-fs tag", field="tag", value=tag, max_len=MAX_TAG_LEN)
    return tag


class VirtioFsDaemon:
    """A running virtiofsd for one shared directory; ``with`` gives the :class:`SharedDir` for VMSpec."""

    def __init__(
        self,
        shared_dir: str | os.PathLike[str],
        socket_path: str | os.PathLike[str],
        *,
        tag: str = "cocoon",
        binary: str = DEFAULT_BINARY,
        cache: CacheMode = "auto",
        sandbox: Literal["namespace", "chroot"] = "namespace",
        ready_timeout: float = READY_TIMEOUT,
        grace: float = 2.0,
    ) -> None:
        self.shared_dir = Path(shared_dir)
        self.socket_path = Path(socket_path)
        self.tag = check_tag(tag)
        self.binary = binary
        self.cache: CacheMode = cache
        self.sandbox: Literal["namespace", "chroot"] = sandbox
        self.ready_timeout = ready_timeout
        self.grace = grace
        self.log_path = self.socket_path.with_name(self.socket_path.name + ".log")
        self.pid: int | None = None
        self._stack = ExitStack()

    @property
    def shared(self) -> SharedDir:
        return SharedDir(tag=self.tag, socket=self.socket_path)

    def start(self) -> SharedDir:
        """Start the daemon and wait for its socket."""
        if not self.shared_dir.is_dir():
            raise NotFound("shared directory not found", path=str(self.shared_dir))
        if not Path(self.binary).is_file():
            raise NotFound("virtiofsd not found (Debian: qemu-system-common)", path=self.binary)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        argv = daemon_argv(self.binary, self.shared_dir, self.socket_path, cache=self.cache, sandbox=self.sandbox)
        stack = self._stack
        try:
            stack.callback(self._remove_socket)
            errlog = stack.enter_context(open(self.log_path, "wb"))  # noqa: SIM115 - the stack closes it
            proc = stack.enter_context(spawn(argv, stderr=errlog, stdout=errlog, grace=self.grace))
            self.pid = proc.pid
            # Registered after spawn's own cleanup, so it runs first: the whole group goes.
            stack.callback(self._kill_group, proc)
            deadline = time.monotonic() + self.ready_timeout
            while not self.socket_path.exists():
                if proc.poll() is not None:
                    raise ProcessError("virtiofsd exited before listening", exit_code=proc.returncode,
                                       stderr=self._log_tail(), shared_dir=str(self.shared_dir))
                if time.monotonic() > deadline:
                    raise ProcessError("virtiofsd did not listen in time", timeout=self.ready_timeout,
                                       stderr=self._log_tail(), socket=str(self.socket_path))
                time.sleep(0.005)
        except BaseException:
            stack.close()
            raise
        log.debug("virtiofsd ready", pid=self.pid, tag=self.tag, shared_dir=str(self.shared_dir))
        return self.shared

    def stop(self) -> None:
        """Kill and reap the daemon (and its sandbox child), remove the socket. Idempotent."""
        self._stack.close()
        self.pid = None

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        # SIGTERM to the group, so the namespaced child goes too; then wait for it to be empty
        # (polling reaps the leader, whose zombie would keep the group alive).
        pgid = proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while proc.poll() is None or _group_alive(pgid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.01)

    def _remove_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-400:]
        except OSError:
            return ""

    def __enter__(self) -> SharedDir:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
