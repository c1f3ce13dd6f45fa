"""The long-lived shim: serves containerd's task API on the socket ``start`` handed over.

It logs (JSON lines, ``subsystem=shim``; the agent's lines as ``subsystem=agent``) to the fifo
containerd made in the bundle (``log``), which containerd copies into its own log. It publishes
events to ``$TTRPC_ADDRESS``. It exits after ``Shutdown`` once no task is left, or on SIGTERM/
SIGINT; either way every task, the VM and every mount go first, and the state directory is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import TextIO

from cocoon import log as cocoon_log
from cocoon.config import Config
from cocoon.errors import InvalidArgument
from cocoon.log import get_logger
from cocoon.shim.launcher import ENV_LISTEN_FD, ENV_STATE_DIR, SOCKET_NAME, Options

log = get_logger("shim")


def _log_stream(bundle: Path) -> TextIO | None:
    """containerd's log fifo in the bundle, opened for writing (None without a reader)."""
    try:
        fd = os.open(bundle / "log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENXIO):
            raise
        return None
    os.set_blocking(fd, True)
    return open(fd, "w", buffering=1, encoding="utf-8", errors="replace")


def run(cfg: Config, opts: Options) -> int:
    """Serve until shut down; the process's exit code."""
    fd_text, state_text = os.environ.get(ENV_LISTEN_FD, ""), os.environ.get(ENV_STATE_DIR, "")
    if not fd_text.isdigit() or not state_text:
        raise InvalidArgument(f"the shim is started by `start` (no {ENV_LISTEN_FD}/{ENV_STATE_DIR})")
    stream = _log_stream(opts.bundle_dir)
    state_dir = Path(state_text)
    cocoon_log.setup(level="debug" if opts.debug else cfg.runtime.log_level, fmt="json",
                     **({"stream": stream} if stream else {"path": state_dir / "shim.log"}))  # fmt: skip
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    listener = socket.socket(fileno=int(fd_text))
    try:
        asyncio.run(_serve(cfg, opts, listener, state_dir))
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
        log.info("shim exited", container=opts.id)
    return 0


async def _serve(cfg: Config, opts: Options, listener: socket.socket, state_dir: Path) -> None:
    from cocoon.protocol.gen.containerd.task.v2 import shim_pb2
    from cocoon.protocol.ttrpc import ListeningSocketTransport, Server
    from cocoon.shim.events import Publisher
    from cocoon.shim.service import SERVICE, TaskService

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), opts.namespace)
    publisher.start()
    service = TaskService(cfg, state_dir, publisher, on_shutdown=stop.set)
    server = Server()
    server.register_service(shim_pb2.DESCRIPTOR.services_by_name["Task"], service)
    assert SERVICE == "containerd.task.v2.Task"
    await server.serve(ListeningSocketTransport(listener, state_dir / SOCKET_NAME))
    log.info("shim serving", container=opts.id, namespace=opts.namespace, pid=os.getpid())
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await service.close()
        await server.shutdown(grace=2.0)
        await publisher.close()
