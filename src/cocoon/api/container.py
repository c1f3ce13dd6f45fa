"""Container operations in CLI mode (what each runc-style command does).

Every operation validates the id first, takes the container's lock when it changes
anything, and talks to the container's monitor (see :mod:`cocoon.api.monitor`) over
its control socket. Only ``create``/``run`` start a monitor; ``state`` and ``list``
read state files and nothing else (no protobuf, no QEMU imports).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal as signals
from collections.abc import Callable
from typing import Any

from cocoon.api.ids import validate_id
from cocoon.api.state import ContainerState, StateStore, Status, refresh_status
from cocoon.config import Config
from cocoon.errors import AgentError, CocoonError, InvalidArgument, NotFound, StateError
from cocoon.log import get_logger

log = get_logger("api")


def store_for(cfg: Config) -> StateStore:
    return StateStore(cfg.runtime.root)


def load(cfg: Config, container_id: str) -> ContainerState:
    """The container's state, with ``stopped`` reported when its monitor is gone."""
    validate_id(container_id)
    return refresh_status(store_for(cfg).load(container_id))


def parse_signal(value: str) -> int:
    """``9``, ``KILL`` or ``SIGKILL`` -> 9; a clear error otherwise."""
    text = value.strip().upper()
    if text.isdigit():
        num = int(text)
        if 0 < num < 65:
            return num
    else:
        name = text if text.startswith("SIG") else "SIG" + text
        with contextlib.suppress(AttributeError):
            return int(getattr(signals.Signals, name))
    raise InvalidArgument(f"invalid signal {value!r}", field="signal")


def refuse_preserved_fds(count: int, first: int = 3) -> None:
    """``--preserve-fds N``: host file descriptors cannot cross into the VM.

    runc hands fds 3..3+N-1 to the container (systemd socket activation through podman/conmon).
    A VM cannot receive them, so if any of them is really open the command fails with one clear
    line instead of starting a container that misses its sockets. A count with nothing open behind
    it (a wrapper passing the flag through) changes nothing and is accepted.
    """
    open_fds = []
    for fd in range(first, first + max(0, count)):
        try:
            os.fstat(fd)
        except OSError:
            continue
        open_fds.append(fd)
    if open_fds:
        raise InvalidArgument(
            "--preserve-fds: file descriptors cannot be passed into the container's VM",
            field="preserve-fds", open_fds=",".join(map(str, open_fds)),
        )  # fmt: skip


# -- create ---------------------------------------------------------------------------------------
def create(cfg: Config, container_id: str, bundle: str, *, console_socket: str | None = None,
           pid_file: str | None = None) -> int:  # fmt: skip
    """Boot the sandbox VM and create the container in it; returns the monitor's PID."""
    from cocoon.oci import spec as oci

    validate_id(container_id)
    spec = oci.load(bundle)
    if spec.process is None:
        raise InvalidArgument("config.json has no process", field="process", file=str(spec.path))
    if spec.process.terminal and not console_socket and not os.isatty(0):
        raise InvalidArgument("process.terminal is true but --console-socket was not given", field="process.terminal")
    store = store_for(cfg)
    state = ContainerState.new(
        container_id, str(spec.bundle), rootfs=str(spec.root.path), annotations=dict(spec.annotations),
        config_sha=spec.sha256, oci_version=spec.oci_version,
    )  # fmt: skip
    store.create(state)  # AlreadyExists: the existing container is left untouched
    try:
        pid = _fork_monitor(cfg, store, state, spec, console_socket)
        if pid_file:
            _write_pid_file(pid_file, pid)
    except BaseException:
        with contextlib.suppress(CocoonError):
            store.delete(container_id)
        raise
    return pid


def _fork_monitor(cfg: Config, store: StateStore, state: ContainerState, spec: Any, console_socket: str | None) -> int:
    def monitor(report: Callable[[BaseException | None], None]) -> int:
        import asyncio

        from cocoon.api.monitor import run_monitor

        return asyncio.run(run_monitor(cfg, store, state, spec, console_socket=console_socket, ready=report))

    return _fork_with_report(monitor)


def _fork_with_report(child: Callable[[Callable[[BaseException | None], None]], int]) -> int:
    """Fork a long-lived host process (own session) and wait until it reports it is set up.

    ``child(report)`` runs in the new process; it calls ``report(None)`` once ready (or
    ``report(exc)``) and returns its exit status. The parent gets the child's PID, or the
    child's error re-raised with its type and context, after the child cleaned up and exited.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 1
        try:
            os.setsid()
            code = child(lambda exc: _report(write_fd, exc))
        except BaseException as exc:
            _report(write_fd, exc)
            with contextlib.suppress(Exception):
                log.error("background process failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            for handler in logging.getLogger("cocoon").handlers:
                with contextlib.suppress(Exception):
                    handler.flush()
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    try:
        report = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        report = {}
    if report.get("ok"):
        return pid
    os.waitpid(pid, 0)  # it has cleaned up and exits; do not leave a zombie
    raise _rebuild_error(report)


def _report(fd: int, exc: BaseException | None) -> None:
    """Tell the parent how set-up went (once: later calls find the pipe closed)."""
    payload: dict[str, Any]
    if exc is None:
        payload = {"ok": True}
    elif isinstance(exc, CocoonError):
        payload = {"ok": False, "type": type(exc).__name__, "message": exc.message,
                   "context": {k: str(v) for k, v in exc.context.items()}}  # fmt: skip
    else:
        payload = {"ok": False, "type": "CocoonError", "message": f"{type(exc).__name__}: {exc}", "context": {}}
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(payload).encode())
        os.close(fd)


def _rebuild_error(report: dict[str, Any]) -> CocoonError:
    from cocoon import errors

    cls = getattr(errors, str(report.get("type", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, CocoonError)):
        cls = CocoonError
    message = str(report.get("message") or "sandbox monitor died during create")
    return cls(message, **dict(report.get("context") or {}))


def _write_pid_file(path: str, pid: int) -> None:
    from cocoon.util.fs import write_atomic

    write_atomic(path, str(pid), mode=0o644)


# -- talking to the monitor -------------------------------------------------------------------
async def _client(state: ContainerState) -> Any:
    from cocoon.protocol.agent_client import AgentClient
    from cocoon.protocol.ttrpc import UnixTransport

    if not state.monitor_socket:
        raise StateError("container has no monitor", id=state.id, state=str(state.status))
    return await AgentClient.connect(UnixTransport(state.monitor_socket))


def _call(state: ContainerState, method: str, *args: Any, **kwargs: Any) -> Any:
    import asyncio

    async def go() -> Any:
        client = await _client(state)
        try:
            return await getattr(client, method)(*args, **kwargs)
        finally:
            await client.close()

    return asyncio.run(go())


# -- simple commands --------------------------------------------------------------------------
def _locked_call(cfg: Config, container_id: str, action: str, method: str) -> None:
    """Lock the container, check ``action`` is allowed in its state, ask its monitor to do it."""
    store = store_for(cfg)
    with store.lock(validate_id(container_id)):
        state = load(cfg, container_id)
        state.status.require(action, id=container_id)
        _call(state, method, container_id)


def start(cfg: Config, container_id: str) -> None:
    _locked_call(cfg, container_id, "start", "start_container")


def kill(cfg: Config, container_id: str, sig: str = "SIGTERM", *, all_processes: bool = False) -> None:
    number = parse_signal(sig)
    state = load(cfg, container_id)
    state.status.require("kill", id=container_id)
    try:
        _call(state, "signal_process", container_id, "", number, all_processes=all_processes)
    except AgentError:
        # The signal may have ended the container before the answer came back: that is success.
        import time

        deadline = time.monotonic() + 3.0
        while load(cfg, container_id).status != Status.STOPPED:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def pause(cfg: Config, container_id: str) -> None:
    _locked_call(cfg, container_id, "pause", "pause_container")


def resume(cfg: Config, container_id: str) -> None:
    _locked_call(cfg, container_id, "resume", "resume_container")


def processes(cfg: Config, container_id: str) -> list[int]:
    """Host-visible PIDs of the container: the monitor stands for every guest process."""
    state = load(cfg, container_id)
    if state.status == Status.STOPPED:
        return []
    return [state.pid]


def guest_processes(cfg: Config, container_id: str) -> list[Any]:
    """The container's processes as its guest kernel sees them (guest pids: ``GuestProcess``);
    none for a stopped container."""
    state = load(cfg, container_id)
    if state.status == Status.STOPPED:
        return []
    return list(_call(state, "list_processes", container_id))


def delete(cfg: Config, container_id: str, *, force: bool = False) -> None:
    """Remove a stopped container (or, with ``force``, kill and remove a live one)."""
    from cocoon.api import hooks
    from cocoon.oci import spec as oci
    from cocoon.storage.shared import unmount_all_below

    store = store_for(cfg)
    validate_id(container_id)
    try:
        with store.lock(container_id):
            state = load(cfg, container_id)
            if state.status != Status.STOPPED and not state.status.can_delete() and not force:
                raise StateError(
                    f"cannot delete container {container_id} that is not stopped: {state.status}",
                    id=container_id, state=str(state.status), required="stopped",
                )  # fmt: skip
            if state.status != Status.STOPPED:
                with contextlib.suppress(CocoonError):
                    _call(state, "destroy_sandbox")
                _wait_gone(state, 10.0)
            with contextlib.suppress(CocoonError, OSError):
                spec = oci.load(state.bundle, require_process=False)
                hooks.run_hooks("poststop", spec.hooks.poststop, {**state.to_oci_state(), "status": "stopped"},
                                fatal=False)  # fmt: skip
            # A monitor that was SIGKILLed could not undo its bind mounts: do it here.
            unmount_all_below(store.dir(container_id))
            store.delete(container_id)
    except NotFound:
        if force:
            return
        raise


def _wait_gone(state: ContainerState, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if refresh_status(state.replace(status=Status.RUNNING)).status == Status.STOPPED:
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(state.pid, signals.SIGKILL)


def run(cfg: Config, container_id: str, bundle: str, *, console_socket: str | None = None,
        pid_file: str | None = None, detach: bool = False) -> int:  # fmt: skip
    """create + start; in the foreground, wait and return the container's exit status."""
    pid = create(cfg, container_id, bundle, console_socket=console_socket, pid_file=pid_file)
    try:
        start(cfg, container_id)
    except BaseException:
        with contextlib.suppress(CocoonError):
            delete(cfg, container_id, force=True)
        raise
    if detach:
        return 0
    forward = {sig: signals.signal(sig, lambda s, _f: os.kill(pid, s)) for sig in (signals.SIGINT, signals.SIGTERM)}
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        for sig, old in forward.items():
            signals.signal(sig, old)
    code = os.waitstatus_to_exitcode(status)
    code = 128 - code if code < 0 else code
    with contextlib.suppress(CocoonError):
        delete(cfg, container_id, force=True)
    return code
