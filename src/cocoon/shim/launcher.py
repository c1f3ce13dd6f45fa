"""The short-lived shim commands containerd runs: ``start`` and ``delete``.

``start`` (cwd: the bundle) prints the address of the shim that will serve the task. The
containers of a pod share their sandbox's shim (and VM): a container whose CRI annotations name
a sandbox gets the address of the shim already serving that sandbox. Any other task gets a new
long-lived shim: ``start`` binds its socket, hands it over to the shim process it spawns (a new
session, so it outlives ``start``), writes ``address`` and ``shim.pid`` in the bundle, prints the
address and exits.

``delete`` runs when containerd cannot reach the shim any more (it died): the VM and virtiofsd
died with it (they get SIGKILL when their owner dies); what outlives it — the rootfs mount, the
share's bind mounts, sockets, the state directory — is removed, and a ``DeleteResponse`` is
written to stdout. If the shim still answers, the task is deleted through it instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import AlreadyExists, InvalidArgument, NotFound
from cocoon.log import get_logger
from cocoon.shim.tasks import CONTAINER_TYPE, SANDBOX_ID

log = get_logger("shim")

#: Environment the long-lived shim reads: the inherited listening socket and its state directory.
ENV_LISTEN_FD = "COCOON_SHIM_LISTEN_FD"
ENV_STATE_DIR = "COCOON_SHIM_STATE_DIR"
SOCKET_NAME = "shim.sock"


@dataclass(frozen=True)
class Options:
    """The flags containerd passes every shim command (runtime v2 contract)."""

    namespace: str
    id: str
    address: str = ""  # containerd's gRPC socket
    publish_binary: str = ""
    bundle: str = ""
    debug: bool = False

    @property
    def bundle_dir(self) -> Path:
        return Path(self.bundle or os.getcwd())


def read_annotations(bundle: Path) -> dict[str, str]:
    """The bundle's config.json annotations (empty if there are none)."""
    path = bundle / "config.json"
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise NotFound("config.json not found in bundle", file=str(path)) from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read config.json: {exc}", file=str(path)) from None
    found = data.get("annotations") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def group_of(task_id: str, notes: dict[str, str]) -> str:
    """The id of the sandbox (VM, shim) a task belongs to: its pod's, or its own."""
    if notes.get(CONTAINER_TYPE) == "container" and notes.get(SANDBOX_ID):
        return notes[SANDBOX_ID]
    return task_id


def state_dir_for(cfg: Config, opts: Options, group: str) -> Path:
    """``<root>/s/<hash>``: per containerd, namespace and sandbox; short enough for unix sockets."""
    digest = hashlib.sha256(f"{opts.address}\0{opts.namespace}\0{group}".encode()).hexdigest()[:16]
    return Path(cfg.runtime.root) / "s" / digest


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def start(cfg: Config, opts: Options) -> str:
    """Find or launch the shim for ``opts.id``; returns its address (``unix://...``)."""
    bundle = opts.bundle_dir
    group = group_of(opts.id, read_annotations(bundle))
    state_dir = state_dir_for(cfg, opts, group)
    sock_path = state_dir / SOCKET_NAME
    address = f"unix://{sock_path}"
    if group != opts.id:
        if not _answers(sock_path):
            raise NotFound("the pod's sandbox has no running shim", sandbox=group, container=opts.id)
        _write(bundle / "address", address)
        return address
    if _answers(sock_path):
        raise AlreadyExists("a shim already serves this id", container=opts.id, path=str(sock_path))
    if state_dir.exists():
        _clean_state(state_dir)
    state_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock_path.unlink(missing_ok=True)
        listener.bind(str(sock_path))
        os.chmod(sock_path, 0o600)
        listener.listen(128)
        proc = _spawn(opts, listener.fileno(), state_dir)
    except BaseException:
        listener.close()
        sock_path.unlink(missing_ok=True)
        raise
    listener.close()
    _write(bundle / "address", address)
    _write(bundle / "shim.pid", str(proc))
    log.info("shim started", container=opts.id, pid=proc, address=address)
    return address


def _spawn(opts: Options, fd: int, state_dir: Path) -> int:
    from cocoon.util.proc import popen

    argv = [sys.executable, "-m", "cocoon.shim", "-namespace", opts.namespace, "-id", opts.id, "-address",
            opts.address, "-publish-binary", opts.publish_binary, "-bundle", str(opts.bundle_dir)]  # fmt: skip
    if opts.debug:
        argv.append("-debug")
    env = {**os.environ, ENV_LISTEN_FD: str(fd), ENV_STATE_DIR: str(state_dir)}
    # A new session and no death signal: the shim must outlive this command (and containerd).
    return popen(argv, env=env, pass_fds=(fd,), new_session=True, die_with_parent=False).pid


def _clean_state(state_dir: Path) -> None:
    """Undo what a dead shim left in ``state_dir`` (mounts, sockets), then remove it."""
    from cocoon.api.sandbox import clean_up

    clean_up(state_dir)
    shutil.rmtree(state_dir, ignore_errors=True)


def delete(cfg: Config, opts: Options) -> tuple[int, float]:
    """Clean up after a shim containerd cannot reach; returns (exit status, exited at)."""
    from cocoon.storage.rootfs import unmount_rootfs

    bundle = opts.bundle_dir
    try:
        group = group_of(opts.id, read_annotations(bundle))
    except (NotFound, InvalidArgument):
        group = opts.id
    state_dir = state_dir_for(cfg, opts, group)
    if _answers(state_dir / SOCKET_NAME):
        # The shim lives: it unmounted the rootfs when the task's Create failed or the task was
        # deleted, and a live task's rootfs is not touched here. A shim left with no task (its
        # first Create failed) is asked to exit.
        if group == opts.id:
            _ask_shutdown(state_dir / SOCKET_NAME, opts.id)
        return 128 + signal.SIGKILL, time.time()
    if group == opts.id:
        _kill_stale_shim(bundle / "shim.pid", state_dir)
        if state_dir.exists():
            _clean_state(state_dir)
    unmount_rootfs(bundle / "rootfs")
    log.info("task cleaned up after its shim", container=opts.id)
    return 128 + signal.SIGKILL, time.time()


def _ask_shutdown(sock: Path, task_id: str) -> None:
    import asyncio

    from cocoon.errors import CocoonError
    from cocoon.protocol.gen.containerd.task.v2 import shim_pb2
    from cocoon.protocol.ttrpc.client import connect_unix

    async def shutdown() -> None:
        async with await connect_unix(sock) as client:
            await client.call("containerd.task.v2.Task", "Shutdown", shim_pb2.ShutdownRequest(id=task_id),
                              _empty(), timeout=10.0)  # fmt: skip

    try:
        asyncio.run(shutdown())
    except (CocoonError, OSError) as exc:
        log.warning("cannot ask the shim to exit", container=task_id, error=str(exc))


def _empty() -> type:
    from google.protobuf.empty_pb2 import Empty

    return Empty


def _kill_stale_shim(pid_file: Path, state_dir: Path) -> None:
    """A shim that no longer answers but still runs (wedged) is killed before its state goes."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return  # gone
    if f"{ENV_STATE_DIR}={state_dir}".encode() in environ.split(b"\0"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.01)
