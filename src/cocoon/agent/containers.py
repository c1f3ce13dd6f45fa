"""Containers in the guest: crun driven by the agent, one bundle per container.

Life cycle of a container (see docs/agent.md)::

    CreateContainer: mount its storages, write /run/cocoon/containers/<id>/config.json (the
                     host's spec adjusted by :mod:`guestspec`), ``crun create`` with the
                     container's stdio pipes (or ``--console-socket``)      -> CREATED
    StartContainer:  ``crun start``                                         -> RUNNING
    Pause/Resume:    ``crun pause`` / ``crun resume``                       <-> PAUSED
    the init exits:  its status comes from the reaper                       -> STOPPED
    RemoveContainer: ``crun kill --all KILL``, wait, ``crun delete --force``, close stdio,
                     unmount storages, remove the bundle                    -> gone

Processes are named by exec id; ``""`` is the container's init. Exec processes start with
``crun exec -d`` and are forgotten once WaitProcess returned their status.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import json
import os
import shutil
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cocoon.agent import cgroups, crun, guestspec, init, mounts
from cocoon.agent.reaper import Reaper
from cocoon.agent.stdio import ProcessIO, console_socket, receive_pty_master
from cocoon.errors import AlreadyExists, CocoonError, InvalidArgument, NotFound, ProcessError, StateError
from cocoon.log import bind, get_logger
from cocoon.protocol.types import ContainerStats, Storage

log = get_logger("agent")

INIT = ""  # exec id of a container's init process


class Status(enum.StrEnum):
    """Where a container is in its life cycle (as crun would report it)."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"

    def can_start(self) -> bool:
        return self is Status.CREATED

    def can_exec(self) -> bool:
        return self is Status.RUNNING

    def can_pause(self) -> bool:
        return self is Status.RUNNING

    def can_resume(self) -> bool:
        return self is Status.PAUSED


@dataclass
class Process:
    """A container process the agent started: its pid, stdio and exit status (a future)."""

    exec_id: str
    pid: int
    io: ProcessIO
    exit: asyncio.Future[int]

    @property
    def exited(self) -> bool:
        return self.exit.done()


@dataclass
class Container:
    id: str
    bundle: str
    cgroup: str
    init: Process
    storages: list[mounts.Mounted]
    status: Status = Status.CREATED
    execs: dict[str, Process] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    oom_kills: int = 0

    def process(self, exec_id: str) -> Process:
        if exec_id == INIT:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFound("no such process", container=self.id, exec_id=exec_id) from None

    @property
    def log_file(self) -> str:
        return f"{self.bundle}/crun.log"


@dataclass(frozen=True)
class ManagerConfig:
    """Where the manager keeps things; the defaults are the guest's."""

    run_dir: str = "/run/cocoon"
    cgroup_root: str = cgroups.CGROUP_ROOT
    crun: crun.CrunConfig = field(default_factory=crun.CrunConfig)
    in_guest: bool = True  # set the hostname, write /etc/resolv.conf, mount storages
    oom_poll_interval: float = 1.0


class ContainerManager:
    """Every container of the sandbox, driven through crun."""

    def __init__(self, reaper: Reaper, cfg: ManagerConfig | None = None) -> None:
        self.reaper = reaper
        self.cfg = cfg or ManagerConfig()
        self.crun = crun.Crun(reaper, self.cfg.crun)
        self._containers: dict[str, Container] = {}
        self._reserved: set[str] = set()
        self._sandbox_storages: list[mounts.Mounted] = []
        self._sandbox_id = ""
        self._tty_ids = itertools.count(1)
        self._oom_queue: asyncio.Queue[str] = asyncio.Queue()
        self._oom_task: asyncio.Task[None] | None = None

    # ---- lookups

    def get(self, container_id: str) -> Container:
        try:
            return self._containers[container_id]
        except KeyError:
            raise NotFound("no such container", container=container_id) from None

    def process(self, container_id: str, exec_id: str) -> Process:
        return self.get(container_id).process(exec_id)

    @property
    def container_ids(self) -> list[str]:
        return sorted(self._containers)

    def _bundle(self, cid: str) -> str:
        return f"{self.cfg.run_dir}/containers/{cid}"

    # ---- sandbox

    async def create_sandbox(self, *, sandbox_id: str = "", hostname: str = "", dns: list[str] | None = None,
                             storages: list[Storage] | None = None) -> None:
        """Hostname, resolv.conf and the sandbox-wide storages (shared by every container)."""
        if self._sandbox_id or self._sandbox_storages:
            raise StateError("sandbox already created", state="created", sandbox=self._sandbox_id)
        if hostname and not init.valid_hostname(hostname):
            raise InvalidArgument("bad hostname", field="hostname", value=hostname[:80])
        self._sandbox_storages = self._mount_all(storages or [])
        if self.cfg.in_guest:
            if hostname:
                init.set_hostname(hostname)  # kernel, /etc/hostname, /etc/hosts
            if dns:
                _write_file("/etc/resolv.conf", resolv_conf(dns))
        self._sandbox_id = sandbox_id or "sandbox"
        log.info("sandbox created", sandbox=sandbox_id, storages=len(self._sandbox_storages))

    async def destroy(self, timeout: float = 5.0) -> None:
        """Remove every container (killing what runs), then the sandbox storages."""
        for cid in list(self._containers):
            try:
                await self.remove(cid, timeout=timeout)
            except CocoonError as exc:
                log.error("remove container failed", container=cid, error=str(exc))
        _unmount_all(self._sandbox_storages)
        self._sandbox_storages = []
        if self._oom_task is not None:
            self._oom_task.cancel()
            self._oom_task = None

    def _mount_all(self, storages: list[Storage]) -> list[mounts.Mounted]:
        for s in storages:
            mounts.validate(s)
        if storages and not self.cfg.in_guest:
            raise StateError("storages are mounted only in the guest", state="host-mode")
        done: list[mounts.Mounted] = []
        try:
            for s in storages:
                done.append(mounts.mount_storage(s))
        except BaseException:
            _unmount_all(done)
            raise
        return done

    # ---- containers

    async def create(self, container_id: str, spec_json: bytes, *, storages: list[Storage] | None = None,
                     devices: list[dict[str, Any]] | None = None) -> Container:
        """Mount storages, write the bundle and ``crun create`` (CREATED)."""
        cid = guestspec.check_id(container_id)
        if cid in self._containers or cid in self._reserved:
            raise AlreadyExists("container exists", container=cid)
        spec = guestspec.load_json_object(spec_json, "oci_spec_json")
        self._reserved.add(cid)
        try:
            with bind(container=cid):
                return await asyncio.shield(self._create(cid, spec, storages or [], devices or []))
        finally:
            self._reserved.discard(cid)

    async def _create(self, cid: str, spec: dict[str, Any], storages: list[Storage],
                      devices: list[dict[str, Any]]) -> Container:
        adjusted, notes = guestspec.adjust_spec(spec, cid, cgroups.cgroups_path(cid))
        adjusted = guestspec.with_devices(adjusted, devices)
        for key, value in guestspec.take_vm_sysctls(adjusted).items():
            _apply_sysctl(key, value)
        for note in notes:
            log.info("spec adjusted for the guest", container=cid, note=note)
        bundle = self._bundle(cid)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(bundle)  # a leftover of an earlier container with this id
        os.makedirs(bundle, mode=0o700)
        mounted: list[mounts.Mounted] = []
        try:
            mounted = self._mount_all(storages)
            root = adjusted["root"]["path"]
            if not os.path.isdir(root):
                raise NotFound("container rootfs not found in the guest", path=root, container=cid)
            _write_file(f"{bundle}/config.json", json.dumps(adjusted))
            terminal = bool(adjusted["process"].get("terminal"))
            log_file = f"{bundle}/crun.log"
            init_proc = await self._start_process(
                lambda sock: crun.create_argv(self.crun.cfg, cid, bundle, f"{bundle}/init.pid",
                                              console_socket=sock, log_file=log_file),
                pid_file=f"{bundle}/init.pid", terminal=terminal, log_file=log_file, exec_id=INIT,
                what="crun create", container=cid)
        except BaseException:
            if os.path.exists(f"{self.crun.cfg.root}/{cid}"):  # created, then failed: undo it
                with contextlib.suppress(CocoonError):
                    await self.crun.call(crun.delete_argv(self.crun.cfg, cid, log_file=f"{bundle}/crun.log"),
                                         log_file=f"{bundle}/crun.log", what="crun delete")
            _unmount_all(mounted)
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        c = Container(cid, bundle, cgroups.cgroup_dir(cid, self.cfg.cgroup_root), init_proc, mounted)
        c.oom_kills = cgroups.oom_kills(c.cgroup)
        init_proc.exit.add_done_callback(lambda _f: self._init_exited(c))
        self._containers[cid] = c
        log.info("container created", container=cid, pid=init_proc.pid, terminal=terminal)
        return c

    def _init_exited(self, c: Container) -> None:
        c.status = Status.STOPPED
        # An OOM-killed init ends the container now: queue the kill before WaitProcess answers
        # (this callback runs first), since the host stops the VM right after.
        self._check_oom(c)
        if not c.init.exit.cancelled() and c.init.exit.exception() is None:
            log.info("container exited", container=c.id, status=c.init.exit.result())

    async def _start_process(self, make_argv: Callable[[str | None], list[str]], *, pid_file: str, terminal: bool,
                             log_file: str, exec_id: str, what: str, container: str) -> Process:
        """Run ``crun create``/``crun exec -d`` with the process's stdio; the started Process."""
        io: ProcessIO | None = None
        sock: socket.socket | None = None
        sock_path = ""
        try:
            if terminal:
                os.makedirs(f"{self.cfg.run_dir}/tty", mode=0o700, exist_ok=True)
                sock_path = f"{self.cfg.run_dir}/tty/{next(self._tty_ids)}.sock"
                sock = console_socket(sock_path)
                await self.crun.call(make_argv(sock_path), log_file=log_file, what=what, container=container)
                io = ProcessIO.terminal(await receive_pty_master(sock))
            else:
                io, child = ProcessIO.pipes()
                try:
                    # The process inherits these through crun; the agent keeps none of the child's
                    # ends, or it would never see end of file on the process's output.
                    await self.crun.call(make_argv(None), log_file=log_file, what=what, container=container,
                                         stdin=child.stdin, stdout=child.stdout, stderr=child.stderr)
                finally:
                    child.close()
            pid = read_pid_file(pid_file)
            exit_future = self.reaper.watch(pid)
            io.start()
            return Process(exec_id, pid, io, exit_future)
        except BaseException:
            if io is not None:
                io.close()
            raise
        finally:
            if sock is not None:
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(sock_path)

    async def start(self, container_id: str) -> None:
        """``crun start``: the init execs the container's process (RUNNING)."""
        # Shielded: a caller that gives up must not leave a half-done transition behind.
        await asyncio.shield(self._start(self.get(container_id)))

    async def _start(self, c: Container) -> None:
        async with c.lock:
            if not c.status.can_start():
                raise StateError("container cannot be started", container=c.id, state=str(c.status),
                                 required=str(Status.CREATED))
            await self.crun.call(crun.simple_argv(self.crun.cfg, "start", c.id, c.log_file), log_file=c.log_file,
                                 what="crun start", container=c.id)
            if c.status is Status.CREATED:  # the init may have exited already
                c.status = Status.RUNNING
        log.info("container started", container=c.id)

    async def exec(self, container_id: str, exec_id: str, process_json: bytes) -> Process:
        """``crun exec -d`` of an OCI process in a running container."""
        c = self.get(container_id)
        eid = guestspec.check_id(exec_id, "exec id")
        process, notes = guestspec.adjust_process(guestspec.load_json_object(process_json, "process_json"))
        for note in notes:
            log.info("process adjusted for the guest", container=c.id, exec_id=eid, note=note)
        return await asyncio.shield(self._exec(c, eid, process))

    async def _exec(self, c: Container, eid: str, process: dict[str, Any]) -> Process:
        async with c.lock:
            if not c.status.can_exec():
                raise StateError("container is not running", container=c.id, state=str(c.status),
                                 required=str(Status.RUNNING))
            if eid in c.execs:
                raise AlreadyExists("exec id in use", container=c.id, exec_id=eid)
            proc_file = f"{c.bundle}/exec-{eid}.json"
            pid_file = f"{c.bundle}/exec-{eid}.pid"
            _write_file(proc_file, json.dumps(process))
            p = await self._start_process(
                lambda sock: crun.exec_argv(self.crun.cfg, c.id, proc_file, pid_file, console_socket=sock,
                                            log_file=c.log_file),
                pid_file=pid_file, terminal=bool(process.get("terminal")), log_file=c.log_file, exec_id=eid,
                what="crun exec", container=c.id)
            c.execs[eid] = p
        log.info("process started", container=c.id, exec_id=eid, pid=p.pid)
        return p

    async def signal(self, container_id: str, exec_id: str, sig: int, *, all_processes: bool = False) -> None:
        """Send ``sig`` to a process: the init (or with ``all_processes`` every process) through
        ``crun kill``, an exec process directly."""
        if not 0 < sig < signal.NSIG:
            raise InvalidArgument("bad signal number", field="signal", value=sig)
        c = self.get(container_id)
        p = c.process(exec_id)
        if p.exited:
            raise NotFound("process already exited", container=c.id, exec_id=exec_id)
        if exec_id == INIT:
            await self.crun.call(crun.kill_argv(self.crun.cfg, c.id, sig, all_processes=all_processes,
                                                log_file=c.log_file),
                                 log_file=c.log_file, what="crun kill", container=c.id)
        else:
            # Until the reaper collected it the pid cannot be reused: this is the process.
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                raise NotFound("process already exited", container=c.id, exec_id=exec_id) from None

    async def wait(self, container_id: str, exec_id: str) -> int:
        """The shell-style exit status, once the process exited and its output was all read."""
        c = self.get(container_id)
        p = c.process(exec_id)
        status = await asyncio.shield(p.exit)
        await p.io.wait_drained()
        if exec_id != INIT and c.execs.get(exec_id) is p:
            del c.execs[exec_id]  # waited for: forgotten, like waitpid(2) reaps
            p.io.close()
        return status

    async def pause(self, container_id: str) -> None:
        """``crun pause``: freeze every process of the container (PAUSED)."""
        await asyncio.shield(self._transition(self.get(container_id), "pause"))

    async def resume(self, container_id: str) -> None:
        """``crun resume``: thaw them (RUNNING)."""
        await asyncio.shield(self._transition(self.get(container_id), "resume"))

    async def _transition(self, c: Container, command: str) -> None:
        async with c.lock:
            ok, required = (c.status.can_pause(), Status.RUNNING) if command == "pause" else \
                (c.status.can_resume(), Status.PAUSED)
            if not ok:
                raise StateError(f"cannot {command} a container that is {c.status}", container=c.id,
                                 state=str(c.status), required=str(required))
            await self.crun.call(crun.simple_argv(self.crun.cfg, command, c.id, c.log_file), log_file=c.log_file,
                                 what=f"crun {command}", container=c.id)
            if command == "pause":
                c.status = Status.PAUSED
            else:
                c.status = Status.STOPPED if c.init.exited else Status.RUNNING
        log.info(f"container {command}d", container=c.id)

    async def update(self, container_id: str, resources_json: bytes) -> None:
        """``crun update --resources``: new OCI LinuxResources for the container's cgroup."""
        c = self.get(container_id)
        resources = guestspec.load_json_object(resources_json, "resources_json")
        async with c.lock:
            path = f"{c.bundle}/resources.json"
            _write_file(path, json.dumps(resources))
            await self.crun.call(crun.update_argv(self.crun.cfg, c.id, path, c.log_file), log_file=c.log_file,
                                 what="crun update", container=c.id)

    def stats(self, container_id: str) -> ContainerStats:
        return cgroups.read_stats(self.get(container_id).cgroup)

    def pids(self, container_id: str) -> list[int]:
        """Every process of the container (pids in the guest), from its cgroup."""
        return cgroups.read_pids(self.get(container_id).cgroup)

    async def remove(self, container_id: str, timeout: float | None = None) -> None:
        """Kill every process, wait for them (``timeout`` seconds; None or 0: forever), ``crun delete``,
        close stdio, unmount the container's storages and remove its bundle."""
        await asyncio.shield(self._remove(self.get(container_id), timeout or None))

    async def _remove(self, c: Container, timeout: float | None) -> None:
        async with c.lock:
            if self._containers.get(c.id) is c:
                await self._remove_locked(c, timeout)

    async def _remove_locked(self, c: Container, timeout: float | None) -> None:
        procs = [c.init, *c.execs.values()]
        if c.status is Status.PAUSED:
            with contextlib.suppress(ProcessError):  # SIGKILL reaches frozen tasks, but be sure
                await self.crun.call(crun.simple_argv(self.crun.cfg, "resume", c.id, c.log_file),
                                     log_file=c.log_file, what="crun resume", container=c.id)
        if not all(p.exited for p in procs):
            try:
                await self.crun.call(crun.kill_argv(self.crun.cfg, c.id, signal.SIGKILL, all_processes=True,
                                                    log_file=c.log_file), log_file=c.log_file, what="crun kill")
            except ProcessError as exc:
                log.debug("crun kill failed, killing the cgroup's processes", container=c.id, error=str(exc))
                for pid in cgroups.read_pids(c.cgroup):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            # And the processes the agent knows, directly: not reaped yet, so their pids are theirs.
            for p in procs:
                if not p.exited:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(asyncio.shield(p.exit) for p in procs), return_exceptions=True)
            except TimeoutError:
                raise ProcessError("container processes did not exit", container=c.id, timeout=timeout) from None
        c.status = Status.STOPPED
        await self.crun.call(crun.delete_argv(self.crun.cfg, c.id, log_file=c.log_file), log_file=c.log_file,
                             what="crun delete", container=c.id)
        for p in procs:
            p.io.close()
        _unmount_all(c.storages)
        shutil.rmtree(c.bundle, ignore_errors=True)
        del self._containers[c.id]
        log.info("container removed", container=c.id)

    # ---- OOM events

    async def oom_event(self) -> str:
        """Wait until a container's cgroup counts a new OOM kill; that container's id."""
        if self._oom_task is None or self._oom_task.done():
            self._oom_task = asyncio.get_running_loop().create_task(self._watch_oom(), name="oom watcher")
        return await self._oom_queue.get()

    async def _watch_oom(self) -> None:
        # memory.events is polled: a counter read per container per interval is cheap, and a
        # container that was OOM-killed before the first GetOOMEvent is still reported.
        while True:
            for c in list(self._containers.values()):
                self._check_oom(c)
            await asyncio.sleep(self.cfg.oom_poll_interval)

    def _check_oom(self, c: Container) -> None:
        n = cgroups.oom_kills(c.cgroup)
        if n > c.oom_kills:
            c.oom_kills = n
            log.warning("container hit its memory limit", container=c.id, oom_kills=n)
            self._oom_queue.put_nowait(c.id)


def read_pid_file(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError) as exc:
        raise ProcessError("crun wrote no usable pid file", path=path, error=str(exc)) from exc


def resolv_conf(dns: list[str]) -> str:
    """/etc/resolv.conf from CreateSandbox's ``dns``: whole lines, or bare server addresses."""
    lines = [entry if " " in entry.strip() else f"nameserver {entry.strip()}" for entry in dns if entry.strip()]
    return "".join(line.strip() + "\n" for line in lines)


def _write_file(path: str, text: str) -> None:
    """Atomically: temp file, fsync, rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _unmount_all(done: list[mounts.Mounted]) -> None:
    for m in reversed(done):
        try:
            mounts.unmount_storage(m)
        except CocoonError as exc:
            log.error("unmount storage failed", mount_point=m.storage.mount_point, error=str(exc))


def _apply_sysctl(key: str, value: str) -> None:
    """Write one sysctl of the VM (``net.ipv4.ip_forward`` -> /proc/sys/net/ipv4/ip_forward)."""
    if not all(part and part not in (".", "..") for part in key.split(".")) or "/" in key:
        raise InvalidArgument("bad sysctl name", field="linux.sysctl", key=key)
    try:
        with open("/proc/sys/" + key.replace(".", "/"), "w") as fh:
            fh.write(value)
    except OSError as exc:
        raise InvalidArgument(f"cannot set sysctl {key}: {exc.strerror}", field="linux.sysctl", key=key) from exc
    log.info("sysctl applied to the VM", key=key, value=value)
