"""`exec`: run another process in a container, with a host stand-in holding its stdio.

The stand-in (this process in the foreground, a forked child with ``--detach``) asks the
container's monitor to start the process in the guest, relays its stdio, forwards the
signals it receives to it, and exits with its exit status, so runc clients can wait on
the PID they were given in ``--pid-file`` exactly as they would with runc.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Callable
from typing import Any

from cocoon.api import stdio
from cocoon.api.container import _fork_with_report, _write_pid_file, load
from cocoon.api.state import ContainerState
from cocoon.config import Config
from cocoon.errors import InvalidArgument
from cocoon.log import bind, get_logger

log = get_logger("api")



def build_process(
    state: ContainerState,
    *,
    process_file: str | None,
    args: list[str],
    tty: bool,
    cwd: str | None,
    env: list[str],
    user: str | None,
) -> dict[str, Any]:
    """The OCI process to run: ``--process FILE`` as given, else the container's process with overrides."""
    from cocoon.oci import spec as oci

    if process_file:
        try:
            with open(process_file, encoding="utf-8") as fh:
                doc = json.load(fh)
        except OSError as exc:
            raise InvalidArgument(f"cannot read process file: {exc.strerror}", file=process_file) from exc
        except ValueError as exc:
            raise InvalidArgument(f"invalid JSON in process file: {exc}", file=process_file) from exc
        oci.parse_process(doc, source=process_file)  # validates; the guest gets the document as is
        return dict(doc)
    if not args:
        raise InvalidArgument("exec needs a command or --process", field="args")
    base = oci.load(state.bundle, require_process=False).raw.get("process") or {}
    doc = dict(base)
    doc["args"] = list(args)
    doc["terminal"] = tty
    if cwd:
        doc["cwd"] = cwd
    if env:
        doc["env"] = [*doc.get("env", []), *env]
    if user:
        uid, _, gid = user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise InvalidArgument("user must be UID[:GID]", field="user", value=user)
        doc["user"] = {**doc.get("user", {}), "uid": int(uid), "gid": int(gid or 0)}
    doc.pop("consoleSize", None)
    return doc


async def _stand_in(
    state: ContainerState,
    exec_id: str,
    process: dict[str, Any],
    console_socket: str | None,
    ready: Callable[[BaseException | None], None],
) -> int:
    from cocoon.api.container import _client

    agent = await _client(state)
    try:
        await agent.exec_process(state.id, exec_id, json.dumps(process).encode())
        io = stdio.ProcessIO(agent, state.id, exec_id)
        await io.start(terminal=bool(process.get("terminal")), console_socket=console_socket)
        ready(None)
        io.forward_signals()
        status = int(await agent.wait_process(state.id, exec_id))  # no deadline
        await io.drain()
        return status
    finally:
        await agent.close()


def exec_process(
    cfg: Config,
    container_id: str,
    process: dict[str, Any] | None = None,
    *,
    detach: bool = False,
    pid_file: str | None = None,
    console_socket: str | None = None,
    **build: Any,
) -> int:
    """Run a process in the container; foreground: its exit status; detached: 0 once it started."""
    state = load(cfg, container_id)
    state.status.require("exec", id=container_id)
    doc = process if process is not None else build_process(state, **build)
    if doc.get("terminal") and not console_socket and not detach and not os.isatty(0):
        raise InvalidArgument("a terminal needs --console-socket or a tty on stdin", field="tty")
    exec_id = secrets.token_hex(8)
    with bind(container=container_id, exec_id=exec_id):
        if detach:
            pid = _fork_with_report(lambda report: asyncio.run(_stand_in(state, exec_id, doc, console_socket, report)))
            if pid_file:
                _write_pid_file(pid_file, pid)
            return 0
        if pid_file:
            _write_pid_file(pid_file, os.getpid())
        return asyncio.run(_stand_in(state, exec_id, doc, console_socket, lambda _exc: None))
