"""The sandbox monitor: the long-lived host process behind one container in CLI mode.

``cocoon create`` forks it. It owns everything of the sandbox: the share's bind mounts,
virtiofsd, the VM and the agent connection, the container's stdio and a control socket
(``monitor.sock``) on which later commands (start, kill, exec, pause, ps, ...) speak the
agent API; the monitor forwards each call to the guest and keeps ``state.json`` current.
Its PID is what ``--pid-file`` receives: it holds the container's stdio, forwards the
signals it gets to the container's init, and exits with the init's exit status (128+N
for a death by signal N, as a shell reports it). When the container's init exits, the
monitor powers the VM off and undoes everything before exiting, so a stopped container
holds no resources; ``delete`` removes the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from cocoon.api import hooks, stdio
from cocoon.api.state import ContainerState, StateStore, Status, process_start_time, rfc3339_nano
from cocoon.config import Config
from cocoon.errors import CocoonError, InvalidArgument, StateError
from cocoon.log import bind, get_logger
from cocoon.oci.model import Spec

log = get_logger("monitor")

AGENT_SERVICE = "cocoon.agent.v1.AgentService"
VM_DIED_STATUS = 137


def vm_size(cfg: Config, spec: Spec) -> tuple[int, int]:
    """Guest memory (MiB) and vCPUs: the configured base plus the container's limits (as Kata does)."""
    from cocoon.api.sandbox import pod_vm_size

    res = spec.linux.resources if spec.linux else None
    if res is None:
        return pod_vm_size(cfg)
    return pod_vm_size(cfg, memory_limit_bytes=res.memory.limit or 0, cpu_quota=res.cpu.quota or 0,
                       cpu_period=res.cpu.period or 0)  # fmt: skip


class Monitor:
    """One container's sandbox, from VM boot to teardown."""

    def __init__(
        self, cfg: Config, store: StateStore, state: ContainerState, spec: Spec, console_socket: str | None
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.state = state
        self.spec = spec
        self.console_socket = console_socket
        self.cid = state.id
        self.agent: Any = None
        self.server: Any = None
        self.io: stdio.ProcessIO | None = None
        self._exit_status: asyncio.Future[int] | None = None
        # `events` clients waiting for the next OOM kill (every client sees every kill).
        self._oom_waiters: list[asyncio.Future[str]] = []

    # -- state -----------------------------------------------------------------------------------
    def _save(self, **changes: Any) -> None:
        self.state = self.state.replace(**changes)
        self.store.save(self.state)

    def oci_state(self) -> dict[str, Any]:
        return self.state.to_oci_state()

    # -- setup -----------------------------------------------------------------------------------
    async def setup(self, stack: AsyncExitStack) -> None:
        """Everything ``create`` must finish before it returns: the sandbox (share, virtiofsd, network,
        VM), the container in it, hooks, stdio and the control socket."""
        from cocoon.api import pod_network
        from cocoon.api.sandbox import Sandbox

        if self.cfg.runtime.shared_fs != "virtio-fs":
            # virtio-9p would need a guest kernel with 9p (Debian's cloud kernel has none): not yet.
            raise InvalidArgument(
                "runtime.shared_fs must be virtio-fs (virtio-9p is not supported yet)",
                field="runtime.shared_fs", value=self.cfg.runtime.shared_fs,
            )  # fmt: skip
        # Sockets in the short socket directory; the share in the container's directory, where
        # `delete` looks for mounts a SIGKILLed monitor left.
        sock_dir = Path(self.store.make_socket_dir(self.cid))
        stack.callback(_rmdir_quiet, sock_dir)
        netns = pod_network.spec_netns(self.spec)
        early_hooks = bool(self.spec.hooks.prestart or self.spec.hooks.create_runtime)
        if not netns and early_hooks and pod_network.wants_new_netns(self.spec):
            # As runc: the new namespace exists before the hooks, at /proc/<state pid>/ns/net, for
            # them to fill (docker's libnetwork moves the container's veth there); the VM gets
            # what they put in it. Without such hooks nothing could fill it: no namespace, no NIC.
            from cocoon.network.netns import unshare_netns

            netns = unshare_netns()
        self._save(pid=os.getpid(), pid_start_time=process_start_time(os.getpid()) or 0)
        self._run_hooks("prestart", self.spec.hooks.prestart)
        self._run_hooks("createRuntime", self.spec.hooks.create_runtime)
        memory, vcpus = vm_size(self.cfg, self.spec)
        sandbox = Sandbox(self.cfg, self.cid, sock_dir, memory_mib=memory, vcpus=vcpus,
                          hostname=self.spec.hostname or self.cid[:63], netns=netns,
                          share_dir=Path(self.store.dir(self.cid)) / "shared")  # fmt: skip
        await stack.enter_async_context(sandbox)
        self.agent = sandbox.agent
        await sandbox.create_container(self.cid, self.spec)
        oom_watch = asyncio.create_task(self._watch_oom(), name="oom watch")
        stack.callback(oom_watch.cancel)
        self._run_hooks("createContainer", self.spec.hooks.create_container)
        await self._start_stdio()
        await self._serve_control(sock_dir / "monitor.sock")
        self._save(status=Status.CREATED, monitor_socket=str(sock_dir / "monitor.sock"), sandbox_id=self.cid)

    def _run_hooks(self, kind: str, hook_list: Any, *, fatal: bool = True) -> None:
        """Run hooks in the host's network namespace, as runc does, even after the monitor left it."""
        if not hook_list:
            return
        from cocoon.network.netns import host_netns_path, run_in_netns

        state = self.oci_state()
        run_in_netns(host_netns_path(), lambda: hooks.run_hooks(kind, hook_list, state, fatal=fatal),
                     what=f"{kind} hooks")  # fmt: skip

    async def _start_stdio(self) -> None:
        proc = self.spec.process
        size = proc.console_size if proc else None
        self.io = stdio.ProcessIO(self.agent, self.cid, "")
        await self.io.start(
            terminal=bool(proc and proc.terminal),
            console_socket=self.console_socket,
            rows=size.height if size else 0,
            cols=size.width if size else 0,
        )

    # -- control socket --------------------------------------------------------------------------
    async def _serve_control(self, path: Path) -> None:
        from cocoon.protocol.gen.agent.v1 import agent_pb2
        from cocoon.protocol.ttrpc import Server

        server = Server()
        service = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
        local = {
            "StartContainer": self._start,
            "PauseContainer": self._pause,
            "ResumeContainer": self._resume,
            "DestroySandbox": self._destroy,
            "GetOOMEvent": self._next_oom,
        }
        from google.protobuf import message_factory

        for method in service.methods:
            req_cls = message_factory.GetMessageClass(method.input_type)
            resp_cls = message_factory.GetMessageClass(method.output_type)
            handler = local.get(method.name) or self._forwarder(method.name, resp_cls)
            server.register(AGENT_SERVICE, method.name, req_cls, handler)
        await server.serve_unix(str(path))
        self.server = server

    def _forwarder(self, method: str, resp_cls: Any) -> Any:
        async def forward(request: Any, ctx: Any) -> Any:
            return await self.agent.client.call(AGENT_SERVICE, method, request, resp_cls,
                                                timeout=ctx.time_remaining())  # fmt: skip

        return forward

    async def _start(self, request: Any, ctx: Any) -> Any:
        from google.protobuf import empty_pb2

        self.state.status.require("start", id=self.cid)
        await self.agent.start_container(self.cid)
        self._save(status=Status.RUNNING, started_at=rfc3339_nano(time.time_ns()))
        self._run_hooks("poststart", self.spec.hooks.poststart, fatal=False)
        return empty_pb2.Empty()

    async def _pause(self, request: Any, ctx: Any) -> Any:
        from google.protobuf import empty_pb2

        self.state.status.require("pause", id=self.cid)
        await self.agent.pause_container(self.cid)
        self._save(status=Status.PAUSED)
        return empty_pb2.Empty()

    async def _resume(self, request: Any, ctx: Any) -> Any:
        from google.protobuf import empty_pb2

        self.state.status.require("resume", id=self.cid)
        await self.agent.resume_container(self.cid)
        self._save(status=Status.RUNNING)
        return empty_pb2.Empty()

    async def _watch_oom(self) -> None:
        # The only GetOOMEvent caller of this sandbox's agent: it hands each kill to every client.
        while True:
            try:
                cid = await self.agent.get_oom_event()
            except CocoonError as exc:  # the VM stopped: the container's end is handled by wait()
                log.debug("oom watch ended", error=str(exc))
                return
            log.warning("container hit its memory limit", oom_container=cid)
            waiters, self._oom_waiters = self._oom_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(cid)

    async def _next_oom(self, request: Any, ctx: Any) -> Any:
        from cocoon.protocol.gen.agent.v1 import agent_pb2

        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._oom_waiters.append(waiter)
        try:
            return agent_pb2.OOMEvent(container_id=await waiter)
        finally:
            if waiter in self._oom_waiters:
                self._oom_waiters.remove(waiter)

    async def _destroy(self, request: Any, ctx: Any) -> Any:
        from google.protobuf import empty_pb2

        log.info("destroy requested")
        if self._exit_status is not None and not self._exit_status.done():
            self._exit_status.set_result(VM_DIED_STATUS)
        return empty_pb2.Empty()

    # -- running ---------------------------------------------------------------------------------
    async def wait(self) -> int:
        """Until the container's init exits (or the VM dies, or delete --force): its status."""
        self._exit_status = asyncio.get_running_loop().create_future()
        if self.io is not None:
            self.io.forward_signals()
        waiter = asyncio.create_task(self.agent.wait_process(self.cid, ""))  # no deadline
        waiter.add_done_callback(self._init_exited)
        status = await self._exit_status
        waiter.cancel()
        if self.io is not None:
            # Everything written before the exit is still in the agent's buffers: drain it.
            await self.io.drain()
        return status

    def _init_exited(self, task: asyncio.Task[int]) -> None:
        if self._exit_status is None or self._exit_status.done() or task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("lost the VM or its agent", error=str(exc))
            self._exit_status.set_result(VM_DIED_STATUS)
        else:
            self._exit_status.set_result(int(task.result()))

    async def teardown(self, status: int) -> None:
        self._save(status=Status.STOPPED, exit_code=status, finished_at=rfc3339_nano(time.time_ns()))
        waiters, self._oom_waiters = self._oom_waiters, []
        for waiter in waiters:  # `events` clients: no more OOM kills to come
            if not waiter.done():
                waiter.set_exception(StateError("container stopped", id=self.cid))
        if self.server is not None:
            # A forwarded call still in flight (say `kill KILL`, answered once crun kill returns,
            # after the init already died) gets its answer before the VM goes away.
            await self.server.shutdown(grace=2.0)


def _rmdir_quiet(path: Path) -> None:
    for child in path.glob("*.sock"):
        with contextlib.suppress(OSError):
            child.unlink()
    with contextlib.suppress(OSError):
        path.rmdir()


async def run_monitor(
    cfg: Config,
    store: StateStore,
    state: ContainerState,
    spec: Spec,
    *,
    console_socket: str | None,
    ready: Callable[[BaseException | None], None],
) -> int:
    """The monitor's whole life; reports set-up success or failure through ``ready``."""
    monitor = Monitor(cfg, store, state, spec, console_socket)
    with bind(container=state.id):
        async with AsyncExitStack() as stack:
            try:
                await monitor.setup(stack)
            except BaseException as exc:
                ready(exc)
                raise
            ready(None)
            status = await monitor.wait()
            log.info("container exited", exit_code=status)
            await monitor.teardown(status)
        return status
