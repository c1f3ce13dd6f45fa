"""The agent API as served inside the guest (Health + AgentService over ttRPC).

Each RPC is an async method named like the protobuf RPC; the ttRPC server answers
UNIMPLEMENTED for the ones not written yet. Errors raised here are Cocoon errors
and cross the VM boundary with their meaning (NotFound -> NOT_FOUND, ...).

Container RPCs are thin: :class:`~cocoon.agent.containers.ContainerManager` does the work,
:mod:`cocoon.protocol.convert` turns its dataclasses into messages. Processes are named by
``(container_id, exec_id)``; exec id ``""`` is the container's init. Exit statuses are shell
style (code, or 128 + signal). ReadStdout/ReadStderr block until there is data and answer
an empty ``data`` at end of stream; WaitProcess answers once the process exited *and* its
output was read to the end (or the container was removed).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import time
from typing import Any

from google.protobuf import empty_pb2

from cocoon import __version__
from cocoon.agent import facts, guestspec
from cocoon.agent.containers import ContainerManager, ManagerConfig
from cocoon.agent.crun import CrunConfig
from cocoon.agent.network import GuestNetwork
from cocoon.agent.reaper import Reaper
from cocoon.agent.stdio import READ_CHUNK
from cocoon.errors import CocoonError, InvalidArgument, ProcessError, StateError
from cocoon.log import get_logger
from cocoon.protocol import convert
from cocoon.protocol.gen.agent.v1 import agent_pb2
from cocoon.protocol.ttrpc import Server, ServerContext
from cocoon.protocol.types import PROTOCOL_VERSION

log = get_logger("agent")

CLOCK_REALTIME = 0


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def set_clock(sec: int, usec: int) -> None:
    """clock_settime(CLOCK_REALTIME): the stdlib has no setter, so libc through ctypes."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    ts = _Timespec(sec, usec * 1000)
    if libc.clock_settime(CLOCK_REALTIME, ctypes.byref(ts)) != 0:
        err = ctypes.get_errno()
        raise ProcessError(f"clock_settime: {os.strerror(err)}", errno=err)


class HealthService:
    """cocoon.agent.v1.Health"""

    async def Check(self, request: Any, ctx: ServerContext) -> Any:
        return agent_pb2.HealthCheckResponse(status=agent_pb2.HealthCheckResponse.SERVING)

    async def Version(self, request: Any, ctx: ServerContext) -> Any:
        return agent_pb2.VersionCheckResponse(protocol_version=PROTOCOL_VERSION, agent_version=__version__)


class AgentService:
    """cocoon.agent.v1.AgentService: sandbox, containers, processes and their stdio."""

    def __init__(self, server: AgentServer) -> None:
        self.server = server

    @property
    def containers(self) -> ContainerManager:
        return self.server.containers

    async def GetGuestDetails(self, request: Any, ctx: ServerContext) -> Any:
        f = facts.collect()
        details = agent_pb2.GuestDetailsResponse(
            kernel_release=f.kernel_release,
            kernel_version=f.kernel_version,
            memory_total_bytes=f.memory_total_kib * 1024,
            cpu_count=f.cpus,
        )
        details.agent_details.version = __version__
        details.agent_details.init_daemon = self.server.in_guest
        details.agent_details.storage_handlers.extend(["virtio-fs", "local", "tmpfs"])
        details.agent_details.capabilities.extend(CAPABILITIES)
        if request.mem_block_size:
            try:
                with open("/sys/devices/system/memory/block_size_bytes") as fh:
                    details.mem_block_size_bytes = int(fh.read().strip(), 16)
            except (OSError, ValueError):
                details.mem_block_size_bytes = 0
        if request.mem_hotplug_probe:
            details.support_mem_hotplug_probe = os.path.exists("/sys/devices/system/memory/probe")
        return details

    async def SetGuestDateTime(self, request: Any, ctx: ServerContext) -> Any:
        if request.sec <= 0 or not 0 <= request.usec < 1_000_000:
            raise InvalidArgument("bad time", field="sec/usec", sec=request.sec, usec=request.usec)
        if self.server.in_guest:
            set_clock(request.sec, request.usec)
            log.info("guest clock set", sec=request.sec)
        else:
            log.info("guest clock not set (host mode)", sec=request.sec)
        return empty_pb2.Empty()

    async def ListProcesses(self, request: Any, ctx: ServerContext) -> Any:
        from cocoon.agent.procs import read_processes

        return convert.processes_to_pb(read_processes(self.containers.pids(request.container_id)))

    async def PrepareSnapshot(self, request: Any, ctx: ServerContext) -> Any:
        await self.server.modules_ready.wait()  # a clone must not start half-way through loading them
        if self.server.in_guest:
            os.sync()
        log.info("ready to be saved as a template")
        return empty_pb2.Empty()

    async def ReseedRandomDev(self, request: Any, ctx: ServerContext) -> Any:
        from cocoon.agent.snapshot import MIN_SEED_BYTES, reseed_random

        if self.server.in_guest:
            reseed_random(bytes(request.data))
        elif len(request.data) < MIN_SEED_BYTES:
            raise InvalidArgument("seed too short", field="data", size=len(request.data), min=MIN_SEED_BYTES)
        return empty_pb2.Empty()

    async def DestroySandbox(self, request: Any, ctx: ServerContext) -> Any:
        # Shielded: the power-off must happen even if the caller stops waiting for the answer.
        await asyncio.shield(self.server.destroy())
        return empty_pb2.Empty()

    # ---- sandbox and containers

    async def CreateSandbox(self, request: Any, ctx: ServerContext) -> Any:
        await self.server.modules_ready.wait()  # storages need virtiofs/overlay
        if request.sandbox_pidns:
            log.warning("sandbox pid namespace not supported: each container has its own")
        if request.guest_hook_path:
            log.warning("guest hooks not supported", path=request.guest_hook_path)
        if request.kernel_modules:
            log.warning("kernel modules on request not supported",
                        modules=",".join(m.name for m in request.kernel_modules))
        if self.server.in_guest:
            self.server.network.loopback_up()
        await self.containers.create_sandbox(
            sandbox_id=request.sandbox_id, hostname=request.hostname, dns=list(request.dns),
            storages=[convert.storage_from_pb(s) for s in request.storages])
        return empty_pb2.Empty()

    async def CreateContainer(self, request: Any, ctx: ServerContext) -> Any:
        await self.server.modules_ready.wait()
        devices = [_device(d) for d in request.devices]
        await self.containers.create(request.container_id, request.oci_spec_json,
                                     storages=[convert.storage_from_pb(s) for s in request.storages],
                                     devices=devices)
        return empty_pb2.Empty()

    async def StartContainer(self, request: Any, ctx: ServerContext) -> Any:
        await self.containers.start(request.container_id)
        return empty_pb2.Empty()

    async def RemoveContainer(self, request: Any, ctx: ServerContext) -> Any:
        await self.containers.remove(request.container_id, timeout=float(request.timeout) or None)
        return empty_pb2.Empty()

    async def PauseContainer(self, request: Any, ctx: ServerContext) -> Any:
        await self.containers.pause(request.container_id)
        return empty_pb2.Empty()

    async def ResumeContainer(self, request: Any, ctx: ServerContext) -> Any:
        await self.containers.resume(request.container_id)
        return empty_pb2.Empty()

    async def StatsContainer(self, request: Any, ctx: ServerContext) -> Any:
        return convert.stats_to_pb(self.containers.stats(request.container_id))

    async def UpdateContainer(self, request: Any, ctx: ServerContext) -> Any:
        await self.containers.update(request.container_id, request.resources_json)
        return empty_pb2.Empty()

    async def GetOOMEvent(self, request: Any, ctx: ServerContext) -> Any:
        return agent_pb2.OOMEvent(container_id=await self.containers.oom_event())

    # ---- processes

    async def ExecProcess(self, request: Any, ctx: ServerContext) -> Any:
        await self.containers.exec(request.container_id, request.exec_id, request.process_json)
        return empty_pb2.Empty()

    async def SignalProcess(self, request: Any, ctx: ServerContext) -> Any:
        await self.containers.signal(request.container_id, request.exec_id, request.signal,
                                     all_processes=request.all)
        return empty_pb2.Empty()

    async def WaitProcess(self, request: Any, ctx: ServerContext) -> Any:
        status = await self.containers.wait(request.container_id, request.exec_id)
        return agent_pb2.WaitProcessResponse(status=status)

    # ---- stdio

    async def WriteStdin(self, request: Any, ctx: ServerContext) -> Any:
        io = self.containers.process(request.container_id, request.exec_id).io
        return agent_pb2.WriteStreamResponse(len=await io.write(request.data))

    async def ReadStdout(self, request: Any, ctx: ServerContext) -> Any:
        io = self.containers.process(request.container_id, request.exec_id).io
        return agent_pb2.ReadStreamResponse(data=await io.stdout.read(request.len or READ_CHUNK))

    async def ReadStderr(self, request: Any, ctx: ServerContext) -> Any:
        io = self.containers.process(request.container_id, request.exec_id).io
        return agent_pb2.ReadStreamResponse(data=await io.stderr.read(request.len or READ_CHUNK))

    async def CloseStdin(self, request: Any, ctx: ServerContext) -> Any:
        self.containers.process(request.container_id, request.exec_id).io.close_stdin()
        return empty_pb2.Empty()

    async def TtyWinResize(self, request: Any, ctx: ServerContext) -> Any:
        if not (0 < request.row < 65536 and 0 < request.column < 65536):
            raise InvalidArgument("bad window size", row=request.row, column=request.column)
        self.containers.process(request.container_id, request.exec_id).io.resize(request.row, request.column)
        return empty_pb2.Empty()

    # ---- networking (cocoon.agent.network; refused in host mode: it would change the host's)

    def _network(self, action: str) -> Any:
        if not self.server.in_guest:
            raise StateError(f"{action}: not in host mode", state="host-mode")
        return self.server.network

    async def UpdateInterface(self, request: Any, ctx: ServerContext) -> Any:
        iface = convert.interface_from_pb(request.interface)
        return convert.interface_to_pb(self._network("update interface").update_interface(iface))

    async def UpdateRoutes(self, request: Any, ctx: ServerContext) -> Any:
        routes = [convert.route_from_pb(r) for r in request.routes.routes]
        done = self._network("update routes").update_routes(routes)
        return agent_pb2.Routes(routes=[convert.route_to_pb(r) for r in done])

    async def AddARPNeighbors(self, request: Any, ctx: ServerContext) -> Any:
        neighbors = [convert.neighbor_from_pb(n) for n in request.neighbors.neighbors]
        self._network("add neighbours").add_neighbors(neighbors)
        return empty_pb2.Empty()

    async def ListInterfaces(self, request: Any, ctx: ServerContext) -> Any:
        found = self._network("list interfaces").list_interfaces()
        return agent_pb2.Interfaces(interfaces=[convert.interface_to_pb(i) for i in found])

    async def ListRoutes(self, request: Any, ctx: ServerContext) -> Any:
        found = self._network("list routes").list_routes()
        return agent_pb2.Routes(routes=[convert.route_to_pb(r) for r in found])


CAPABILITIES = ("containers", "virtio-fs", "oom-events", "network")


def _device(d: Any) -> dict[str, Any]:
    """A Device of CreateContainerRequest -> a linux.devices entry, from the node in the guest."""
    if not d.vm_path or not d.container_path:
        raise InvalidArgument("device needs vm_path and container_path", id=d.id)
    try:
        st = os.stat(d.vm_path)
    except FileNotFoundError:
        raise InvalidArgument("device not found in the guest", vm_path=d.vm_path, id=d.id) from None
    return guestspec.device_entry(d.container_path, d.vm_path, st.st_mode, st.st_rdev)


class AgentServer:
    """The ttRPC server with both services, and the agent's life cycle.

    Serving starts the reaper (SIGCHLD) and the container manager; stopping destroys every
    container, then closes the server. In host mode (``in_guest=False``, tests) containers
    live under a private run directory and the agent adopts orphans as a subreaper.
    """

    def __init__(self, *, in_guest: bool, manager: ManagerConfig | None = None) -> None:
        self.in_guest = in_guest
        self.started = time.monotonic()
        self.server = Server()
        self.reaper = Reaper()
        if manager is None and not in_guest:
            run_dir = f"/tmp/cocoon-agent-{os.getpid()}"
            manager = ManagerConfig(run_dir=run_dir, crun=CrunConfig(root=f"{run_dir}/crun"), in_guest=False)
        self.containers = ContainerManager(self.reaper, manager)
        self.network = GuestNetwork()  # its netlink socket opens on first use
        self.server.register_service(agent_pb2.DESCRIPTOR.services_by_name["Health"], HealthService())
        self.server.register_service(agent_pb2.DESCRIPTOR.services_by_name["AgentService"], AgentService(self))
        self._stop = asyncio.Event()
        #: Set once every kernel module is loaded (the guest loads the late ones while serving).
        self.modules_ready = asyncio.Event()
        self.modules_ready.set()
        self._destroying: asyncio.Task[None] | None = None

    def request_shutdown(self) -> None:
        self._stop.set()

    def start(self) -> None:
        """Take over SIGCHLD (idempotent; in the running loop)."""
        if not self.reaper.installed:
            self.reaper.install(subreaper=not self.in_guest)

    def destroy(self) -> asyncio.Task[None]:
        """Remove every container, then stop serving (powering off in the guest). Idempotent."""
        if self._destroying is None:
            self._destroying = asyncio.get_running_loop().create_task(self._destroy(), name="destroy sandbox")
        return self._destroying

    async def _destroy(self) -> None:
        log.info("destroy sandbox: removing containers", containers=len(self.containers.container_ids))
        try:
            await self.containers.destroy()
        except CocoonError as exc:
            log.error("destroy sandbox: cleanup failed", error=str(exc))
        finally:
            log.info("destroy sandbox: powering off")
            # The answer goes out first; the server's grace period lets it.
            asyncio.get_running_loop().call_later(0.01, self.request_shutdown)

    async def _run_until_stopped(self) -> None:
        try:
            await self._stop.wait()
            await self.server.shutdown(grace=1.0)
            await self.destroy()
        finally:
            self.reaper.close()

    async def serve_unix(self, path: str) -> None:
        self.start()
        await self.server.serve_unix(path)
        log.info("agent serving", channel=f"unix:{path}")
        await self._run_until_stopped()

    async def serve_vsock(self, port: int) -> None:
        self.start()
        await self.server.serve_vsock(port)
        log.info("agent serving", channel=f"vsock:{port}")
        await self._run_until_stopped()

    async def serve_chardev(self, path: str) -> None:
        self.start()
        await self.server.serve_chardev(path)
        log.info("agent serving", channel=path, ready_ms=round((time.monotonic() - self.started) * 1000))
        await self._run_until_stopped()
