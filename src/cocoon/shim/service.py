"""containerd's task service (``containerd.task.v2.Task``) on top of the library API.

One shim serves one VM: a pod's (the CRI sandbox container creates it, the pod's containers join
it) or a lone container's (``ctr run``). Each RPC checks its request, calls
:mod:`cocoon.api.sandbox` and answers in containerd's terms; events are published in the order
the runtime v2 contract asks for (see :mod:`cocoon.shim.events`). Errors cross as ttRPC status
codes containerd's errdefs understand (NotFound, AlreadyExists, FailedPrecondition, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from google.protobuf.empty_pb2 import Empty

from cocoon.api.sandbox import Sandbox, pod_vm_size
from cocoon.config import Config
from cocoon.errors import AlreadyExists, CocoonError, InvalidArgument, NotFound, StateError
from cocoon.log import bind, get_logger
from cocoon.protocol.gen.containerd.cgroups.v2 import metrics_pb2
from cocoon.protocol.gen.containerd.events import task_pb2 as ev
from cocoon.protocol.gen.containerd.task.v2 import shim_pb2 as pb
from cocoon.protocol.gen.containerd.types.task import task_pb2 as types_pb
from cocoon.protocol.ttrpc.errors import Unimplemented
from cocoon.protocol.types import ContainerStats
from cocoon.shim import events as topics
from cocoon.shim.events import Publisher, pack, timestamp
from cocoon.shim.fifo_io import ProcessIO
from cocoon.shim.tasks import (
    CONTAINER_TYPE,
    CREATED,
    PAUSED,
    RUNNING,
    SANDBOX_ID,
    PauseProcess,
    ShimProcess,
    Task,
    pod_limits,
)
from cocoon.storage.rootfs import RootfsMount, mount_rootfs, unmount_rootfs

log = get_logger("shim")

SERVICE = "containerd.task.v2.Task"
VERSION = "cocoon-shim-v2"


class TaskService:
    """The handlers of ``containerd.task.v2.Task`` (registered by name with the ttRPC server)."""

    def __init__(self, cfg: Config, state_dir: Path, publisher: Publisher, *, on_shutdown: Callable[[], None]):
        self.cfg = cfg
        self.state_dir = state_dir
        self.publisher = publisher
        self.pid = os.getpid()
        self._on_shutdown = on_shutdown
        self.sandbox: Sandbox | None = None
        self.tasks: dict[str, Task] = {}
        self._lock = asyncio.Lock()
        self._oom: asyncio.Task[None] | None = None

    # -- helpers -----------------------------------------------------------------------------------
    def _task(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFound("no such task", container=task_id)
        return task

    def _exited(self, proc: ShimProcess) -> None:
        self.publisher.publish(topics.TASK_EXIT, ev.TaskExit(
            container_id=proc.task_id, id=proc.exec_id or proc.task_id, pid=proc.pid,
            exit_status=proc.exit_status, exited_at=timestamp(proc.exited_at)))  # fmt: skip
        log.info("process exited", container=proc.task_id, exec_id=proc.exec_id or None, status=proc.exit_status)

    async def _start_sandbox(self, sandbox_id: str, spec: Any) -> Sandbox:
        memory, quota, period = pod_limits(spec.raw)
        mem_mib, vcpus = pod_vm_size(self.cfg, memory_limit_bytes=memory, cpu_quota=quota, cpu_period=period)
        from cocoon.api.pod_network import spec_netns

        # The pod's network namespace (made by CRI's CNI plugins): its interfaces are wired to the VM.
        sandbox = Sandbox(self.cfg, sandbox_id, self.state_dir, memory_mib=mem_mib, vcpus=vcpus,
                          hostname=spec.hostname, netns=spec_netns(spec))  # fmt: skip
        await sandbox.start()
        self.sandbox = sandbox
        self._oom = asyncio.get_running_loop().create_task(self._watch_oom(sandbox), name="oom events")
        return sandbox

    async def _watch_oom(self, sandbox: Sandbox) -> None:
        while True:
            try:
                cid = await sandbox.next_oom()
            except CocoonError:
                return  # the sandbox stopped
            log.info("container hit its memory limit", container=cid)
            self.publisher.publish(topics.TASK_OOM, ev.TaskOOM(container_id=cid))

    async def _stop_sandbox(self) -> None:
        sandbox, self.sandbox = self.sandbox, None
        if self._oom is not None:
            self._oom.cancel()
            self._oom = None
        if sandbox is not None:
            await sandbox.stop()

    # -- task life cycle ---------------------------------------------------------------------------
    # Handlers are named like the RPCs (containerd.task.v2.Task), as the ttRPC server looks them up.
    async def Create(self, req: Any, ctx: object) -> pb.CreateTaskResponse:
        from cocoon.oci import spec as oci_spec

        async with self._lock:
            if req.id in self.tasks:
                raise AlreadyExists("task already exists", container=req.id)
            if req.checkpoint:
                raise Unimplemented("restoring a checkpoint is not supported", container=req.id)
            bundle = Path(req.bundle)
            with bind(container=req.id):
                rootfs = bundle / "rootfs"
                mounted = mount_rootfs([RootfsMount(m.type, m.source, tuple(m.options)) for m in req.rootfs], rootfs)
                try:
                    task = await self._create(req, bundle, oci_spec.load(bundle), mounted)
                except BaseException:
                    if mounted:
                        unmount_rootfs(rootfs)
                    raise
            self.tasks[req.id] = task
            self.publisher.publish(topics.TASK_CREATE, ev.TaskCreate(
                container_id=req.id, bundle=req.bundle, rootfs=req.rootfs, pid=task.init.pid,
                io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                             terminal=req.terminal)))  # fmt: skip
            log.info("task created", container=req.id, kind=(task.container and "container") or "sandbox")
            return pb.CreateTaskResponse(pid=task.init.pid)

    async def _create(self, req: Any, bundle: Path, spec: Any, rootfs_mounted: bool) -> Task:
        kind = spec.annotations.get(CONTAINER_TYPE, "")
        io = ProcessIO(req.id, req.stdin, req.stdout, req.stderr, terminal=req.terminal)
        if kind == "sandbox":  # a pod: the VM, and a pause that needs no process
            if self.sandbox is not None:
                raise AlreadyExists("this shim already runs a sandbox", container=req.id, sandbox=self.sandbox.id)
            await self._start_sandbox(req.id, spec)
            return Task(req.id, bundle, PauseProcess(req.id, "", io, pid=self.pid), rootfs_mounted, owns_sandbox=True)
        owns = False
        if kind == "container":
            wanted = spec.annotations.get(SANDBOX_ID, "")
            if self.sandbox is None or self.sandbox.id != wanted:
                raise StateError("the pod's sandbox does not run in this shim", container=req.id,
                                 sandbox=wanted)  # fmt: skip
            sandbox = self.sandbox
        elif self.sandbox is None:  # a container alone in its VM (ctr run, docker)
            sandbox, owns = await self._start_sandbox(req.id, spec), True
        else:
            raise AlreadyExists("this shim already runs a container", container=req.id, sandbox=self.sandbox.id)
        try:
            io.open()
            try:
                container = await sandbox.create_container(req.id, spec)
            except BaseException:
                io.close()
                raise
        except BaseException:
            if owns:
                await self._stop_sandbox()
            raise
        init = ShimProcess(req.id, "", io, pid=self.pid)
        init.guest = container.init
        return Task(req.id, bundle, init, rootfs_mounted, container=container, owns_sandbox=owns)

    async def Start(self, req: Any, ctx: object) -> pb.StartResponse:
        task = self._task(req.id)
        proc = task.process(req.exec_id)
        if proc.status != CREATED:
            raise StateError("process already started", container=req.id, exec_id=req.exec_id or None)
        with bind(container=req.id):
            if isinstance(proc, PauseProcess):
                proc.start(self._exited)
            elif not req.exec_id:
                assert task.container is not None
                await task.container.start()
                proc.status = RUNNING
                self.publisher.publish(topics.TASK_START, ev.TaskStart(container_id=req.id, pid=proc.pid))
                proc.attach(task.container.init, self._exited)
                return pb.StartResponse(pid=proc.pid)
            else:
                assert task.container is not None and proc.spec is not None
                proc.io.open()
                guest = await task.container.exec(req.exec_id, proc.spec)
                proc.status = RUNNING
                self.publisher.publish(topics.TASK_EXEC_STARTED, ev.TaskExecStarted(
                    container_id=req.id, exec_id=req.exec_id, pid=proc.pid))  # fmt: skip
                proc.attach(guest, self._exited)
                return pb.StartResponse(pid=proc.pid)
        self.publisher.publish(topics.TASK_START, ev.TaskStart(container_id=req.id, pid=proc.pid))
        return pb.StartResponse(pid=proc.pid)

    async def Delete(self, req: Any, ctx: object) -> pb.DeleteResponse:
        task = self._task(req.id)
        if req.exec_id:
            proc = task.process(req.exec_id)
            if proc.status == RUNNING:
                raise StateError("cannot delete a running process", container=req.id, exec_id=req.exec_id,
                                 state="running")  # fmt: skip
            proc.close()
            del task.execs[req.exec_id]
            return _delete_response(proc)
        async with self._lock:
            if task.status in (RUNNING, PAUSED):
                raise StateError("cannot delete a running task", container=req.id, state="running")
            with bind(container=req.id):
                await self._remove(task)
            self.publisher.publish(topics.TASK_DELETE, ev.TaskDelete(
                container_id=req.id, pid=task.init.pid, exit_status=task.init.exit_status,
                exited_at=timestamp(task.init.exited_at), id=req.id))  # fmt: skip
            log.info("task deleted", container=req.id)
            return _delete_response(task.init)

    async def _remove(self, task: Task) -> None:
        """Everything of ``task`` goes: its processes, its container in the guest, its rootfs mount;
        the VM too if the task owns it."""
        try:
            for proc in [task.init, *task.execs.values()]:
                proc.close()
            if task.container is not None and not task.container.removed:
                await task.container.remove()
            if task.owns_sandbox:
                for other in list(self.tasks.values()):
                    if other is not task:
                        log.warning("sandbox deleted before its container", container=other.id)
                await self._stop_sandbox()
        finally:
            if task.rootfs_mounted:
                unmount_rootfs(task.bundle / "rootfs")
                task.rootfs_mounted = False
            self.tasks.pop(task.id, None)

    # -- processes ---------------------------------------------------------------------------------
    async def Exec(self, req: Any, ctx: object) -> Empty:
        task = self._task(req.id)
        if task.container is None:
            raise InvalidArgument("cannot exec in a pod's sandbox container", container=req.id)
        if req.exec_id in task.execs:
            raise AlreadyExists("exec id in use", container=req.id, exec_id=req.exec_id)
        if task.status != RUNNING:
            raise StateError("cannot exec: the task is not running", container=req.id, exec_id=req.exec_id)
        try:
            spec = json.loads(req.spec.value or b"{}")
        except ValueError as exc:
            raise InvalidArgument(f"exec spec is not JSON: {exc}", container=req.id, exec_id=req.exec_id) from None
        if not isinstance(spec, dict):
            raise InvalidArgument("exec spec must be an OCI process object", container=req.id, exec_id=req.exec_id)
        spec["terminal"] = bool(req.terminal)
        io = ProcessIO(f"{req.id}/{req.exec_id}", req.stdin, req.stdout, req.stderr, terminal=req.terminal)
        task.execs[req.exec_id] = ShimProcess(req.id, req.exec_id, io, pid=self.pid, spec=spec)
        self.publisher.publish(topics.TASK_EXEC_ADDED, ev.TaskExecAdded(container_id=req.id, exec_id=req.exec_id))
        return Empty()

    async def Kill(self, req: Any, ctx: object) -> Empty:
        task = self._task(req.id)
        proc = task.process(req.exec_id)
        if req.all and not req.exec_id and task.container is not None:
            if proc.exited:
                raise NotFound("process already finished", container=req.id)
            await task.container.signal(req.signal, all=True)
        else:
            await proc.signal(req.signal)
        return Empty()

    async def Wait(self, req: Any, ctx: object) -> pb.WaitResponse:
        proc = self._task(req.id).process(req.exec_id)
        status = await proc.wait()
        return pb.WaitResponse(exit_status=status, exited_at=timestamp(proc.exited_at))

    async def State(self, req: Any, ctx: object) -> pb.StateResponse:
        task = self._task(req.id)
        proc = task.process(req.exec_id)
        stdin, stdout, stderr = proc.io.paths
        response = pb.StateResponse(id=req.id, bundle=str(task.bundle), pid=proc.pid, status=cast(Any, proc.status),
                                    stdin=stdin, stdout=stdout, stderr=stderr, terminal=proc.io.terminal,
                                    exit_status=proc.exit_status, exec_id=req.exec_id)  # fmt: skip
        if proc.exited_at is not None:
            response.exited_at.CopyFrom(timestamp(proc.exited_at))
        return response

    async def Pids(self, req: Any, ctx: object) -> pb.PidsResponse:
        # Guest PIDs mean nothing on the host: every process of the task is represented by the shim.
        task = self._task(req.id)
        return pb.PidsResponse(processes=[types_pb.ProcessInfo(pid=task.init.pid)])

    async def ResizePty(self, req: Any, ctx: object) -> Empty:
        proc = self._task(req.id).process(req.exec_id)
        # A client without a terminal of its own sends 0x0: nothing to apply.
        if proc.guest is not None and proc.io.terminal and not proc.exited and req.width and req.height:
            await proc.guest.resize(rows=req.height, cols=req.width)
        return Empty()

    async def CloseIO(self, req: Any, ctx: object) -> Empty:
        proc = self._task(req.id).process(req.exec_id)
        if req.stdin:
            await proc.io.close_stdin()
        return Empty()

    # -- the container as a whole ------------------------------------------------------------------
    async def Pause(self, req: Any, ctx: object) -> Empty:
        await self._freeze(req.id, pause=True)
        return Empty()

    async def Resume(self, req: Any, ctx: object) -> Empty:
        await self._freeze(req.id, pause=False)
        return Empty()

    async def _freeze(self, task_id: str, *, pause: bool) -> None:
        task = self._task(task_id)
        if task.container is not None:
            await (task.container.pause() if pause else task.container.resume())
        elif task.status != (RUNNING if pause else PAUSED):
            raise StateError(f"cannot {'pause' if pause else 'resume'}: the task is not "
                             f"{'running' if pause else 'paused'}", container=task_id)  # fmt: skip
        task.init.status = PAUSED if pause else RUNNING
        if pause:
            self.publisher.publish(topics.TASK_PAUSED, ev.TaskPaused(container_id=task_id))
        else:
            self.publisher.publish(topics.TASK_RESUMED, ev.TaskResumed(container_id=task_id))

    async def Update(self, req: Any, ctx: object) -> Empty:
        task = self._task(req.id)
        if task.container is None:
            return Empty()  # the pause has no cgroup of its own; the VM was sized at start
        try:
            resources = json.loads(req.resources.value or b"{}")
        except ValueError as exc:
            raise InvalidArgument(f"resources are not JSON: {exc}", container=req.id) from None
        await task.container.update(resources)
        return Empty()

    async def Stats(self, req: Any, ctx: object) -> pb.StatsResponse:
        task = self._task(req.id)
        stats = await task.container.stats() if task.container is not None else ContainerStats()
        return pb.StatsResponse(stats=pack(metrics(stats)))

    async def Checkpoint(self, req: Any, ctx: object) -> Empty:
        raise Unimplemented("checkpoint is not supported: a VM's container cannot be checkpointed by crun",
                            container=req.id)  # fmt: skip

    # -- the shim ----------------------------------------------------------------------------------
    async def Connect(self, req: Any, ctx: object) -> pb.ConnectResponse:
        task = self.tasks.get(req.id)
        return pb.ConnectResponse(shim_pid=self.pid, task_pid=task.init.pid if task else 0, version=VERSION)

    async def Shutdown(self, req: Any, ctx: object) -> Empty:
        if req.now or not self.tasks:
            log.info("shutting down", tasks=len(self.tasks))
            asyncio.get_running_loop().call_soon(self._on_shutdown)
        return Empty()

    async def close(self) -> None:
        """Undo everything (shim exiting): every task, the VM, the rootfs mounts."""
        async with self._lock:
            for task in list(self.tasks.values()):
                with contextlib.suppress(CocoonError):
                    await self._remove(task)
            await self._stop_sandbox()


def _delete_response(proc: ShimProcess) -> pb.DeleteResponse:
    response = pb.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status)
    if proc.exited_at is not None:
        response.exited_at.CopyFrom(timestamp(proc.exited_at))
    return response


def metrics(stats: ContainerStats) -> Any:
    """Our cgroup v2 counters as containerd's ``io.containerd.cgroups.v2.Metrics``."""
    mem = stats.memory
    stat = mem.stat
    known = {f.name for f in metrics_pb2.MemoryStat.DESCRIPTOR.fields}
    return metrics_pb2.Metrics(
        pids=metrics_pb2.PidsStat(current=stats.pids.current, limit=stats.pids.limit),
        cpu=metrics_pb2.CPUStat(usage_usec=stats.cpu.usage_usec, user_usec=stats.cpu.user_usec,
                                system_usec=stats.cpu.system_usec, nr_periods=stats.cpu.nr_periods,
                                nr_throttled=stats.cpu.nr_throttled, throttled_usec=stats.cpu.throttled_usec),
        memory=metrics_pb2.MemoryStat(usage=mem.usage, usage_limit=mem.limit, swap_usage=mem.swap_usage,
                                      swap_limit=mem.swap_limit,
                                      **{k: v for k, v in stat.items() if k in known and k not in _MEM_TOP}),
        io=metrics_pb2.IOStat(usage=[metrics_pb2.IOEntry(major=d.major, minor=d.minor, rbytes=d.rbytes,
                                                         wbytes=d.wbytes, rios=d.rios, wios=d.wios)
                                     for d in stats.io]),
    )  # fmt: skip


_MEM_TOP = frozenset({"usage", "usage_limit", "swap_usage", "swap_limit"})
