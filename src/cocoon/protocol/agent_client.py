"""The host's client of the guest agent: typed calls, dataclasses out, Cocoon errors.

    agent = await AgentClient.connect(UnixTransport(vm_dir / "agent.sock"))
    details = await agent.guest_details()

Every call has a deadline (``timeout`` per call, else the client default). Failures
become :class:`cocoon.errors.AgentTimeout` (no answer in time) or
:class:`cocoon.errors.AgentError` with ``method`` and the status ``code`` in context;
the ttrpc error is chained as ``__cause__``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from cocoon import errors
from cocoon.protocol import convert
from cocoon.protocol.gen.agent.v1 import agent_pb2
from cocoon.protocol.ttrpc.client import Client
from cocoon.protocol.ttrpc.errors import DeadlineExceeded, ProtocolError, RPCError
from cocoon.protocol.ttrpc.transport import Transport
from cocoon.protocol.types import (
    ContainerStats,
    GuestDetails,
    GuestProcess,
    HealthStatus,
    NetInterface,
    NetNeighbor,
    NetRoute,
    Storage,
    VersionInfo,
)

AGENT_SERVICE = "cocoon.agent.v1.AgentService"
HEALTH_SERVICE = "cocoon.agent.v1.Health"
DEFAULT_TIMEOUT = 10.0
#: ``timeout=NO_TIMEOUT``: the call has no deadline (long polls: ReadStdout, WaitProcess, GetOOMEvent).
NO_TIMEOUT = math.inf

M = TypeVar("M", bound=Message)


class AgentClient:
    """Typed calls to the agent over one ttrpc connection."""

    def __init__(self, client: Client, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.client = client
        self.timeout = timeout

    @classmethod
    async def connect(cls, transport: Transport, *, timeout: float = DEFAULT_TIMEOUT) -> AgentClient:
        """Connect to the agent through ``transport``; raises AgentError if it cannot be reached."""
        try:
            client = await Client.connect(transport)
        except ProtocolError as exc:
            raise errors.AgentError("connect to agent", transport=repr(transport), error=str(exc)) from exc
        return cls(client, timeout=timeout)

    async def _call(self, service: str, method: str, request: Message, response_type: type[M],
                    timeout: float | None) -> M:
        deadline = self.timeout if timeout is None else timeout
        name = f"{service.rpartition('.')[2]}/{method}"
        try:
            return await self.client.call(service, method, request, response_type, timeout=deadline)
        except DeadlineExceeded as exc:
            raise errors.AgentTimeout(f"agent {name}: no answer in time", method=name, timeout=deadline) from exc
        except RPCError as exc:
            raise errors.AgentError(f"agent {name}: {exc.status_message}", method=name, code=exc.code.name) from exc
        except ProtocolError as exc:
            raise errors.AgentError(f"agent {name}: {exc.message}", method=name, error=str(exc)) from exc

    async def check(self, *, timeout: float | None = None) -> HealthStatus:
        """Health.Check: is the agent serving?"""
        reply: Any = await self._call(HEALTH_SERVICE, "Check", agent_pb2.CheckRequest(),
                                      agent_pb2.HealthCheckResponse, timeout)
        return convert.health_from_pb(reply)

    async def version(self, *, timeout: float | None = None) -> VersionInfo:
        """Health.Version: agent and protocol versions."""
        reply: Any = await self._call(HEALTH_SERVICE, "Version", agent_pb2.CheckRequest(),
                                      agent_pb2.VersionCheckResponse, timeout)
        return convert.version_from_pb(reply)

    async def guest_details(self, *, mem_block_size: bool = False, mem_hotplug_probe: bool = False,
                            timeout: float | None = None) -> GuestDetails:
        """AgentService.GetGuestDetails: kernel, memory, CPUs, agent version and capabilities."""
        request = agent_pb2.GuestDetailsRequest(mem_block_size=mem_block_size, mem_hotplug_probe=mem_hotplug_probe)
        reply: Any = await self._call(AGENT_SERVICE, "GetGuestDetails", request,
                                      agent_pb2.GuestDetailsResponse, timeout)
        return convert.guest_details_from_pb(reply)

    async def set_guest_datetime(self, when: dt.datetime | None = None, *, timeout: float | None = None) -> None:
        """AgentService.SetGuestDateTime: set the guest clock (default: the host's now)."""
        request = convert.datetime_to_pb(when or dt.datetime.now(dt.UTC))
        await self._call(AGENT_SERVICE, "SetGuestDateTime", request, empty_pb2.Empty, timeout)

    async def destroy_sandbox(self, *, timeout: float | None = None) -> None:
        """AgentService.DestroySandbox: stop everything in the guest and power it off."""
        await self._call(AGENT_SERVICE, "DestroySandbox", agent_pb2.DestroySandboxRequest(), empty_pb2.Empty, timeout)

    async def list_processes(self, container_id: str, *, timeout: float | None = None) -> tuple[GuestProcess, ...]:
        """AgentService.ListProcesses: the container's processes with their guest pids."""
        request = agent_pb2.ListProcessesRequest(container_id=container_id)
        reply = await self._call(AGENT_SERVICE, "ListProcesses", request, agent_pb2.ListProcessesResponse, timeout)
        return convert.processes_from_pb(reply)

    async def prepare_snapshot(self, *, timeout: float | None = None) -> None:
        """AgentService.PrepareSnapshot: returns once the guest can be saved as a template."""
        await self._call(AGENT_SERVICE, "PrepareSnapshot", agent_pb2.PrepareSnapshotRequest(), empty_pb2.Empty,
                         timeout)  # fmt: skip

    async def reseed_random_dev(self, data: bytes, *, timeout: float | None = None) -> None:
        """AgentService.ReseedRandomDev: credit ``data`` to the guest's random pool and reseed its CRNG."""
        await self._call(AGENT_SERVICE, "ReseedRandomDev", agent_pb2.ReseedRandomDevRequest(data=data),
                         empty_pb2.Empty, timeout)  # fmt: skip

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- containers (appended with the container RPCs)

    async def _call_agent(self, method: str, request: Message, response_type: type[M], timeout: float | None) -> M:
        """AgentService call; ``timeout`` None: the client default, :data:`NO_TIMEOUT`: no deadline."""
        if timeout is None or not math.isinf(timeout):
            return await self._call(AGENT_SERVICE, method, request, response_type, timeout)
        name = f"AgentService/{method}"
        try:
            return await self.client.call(AGENT_SERVICE, method, request, response_type, timeout=None)
        except RPCError as exc:
            raise errors.AgentError(f"agent {name}: {exc.status_message}", method=name, code=exc.code.name) from exc
        except ProtocolError as exc:
            raise errors.AgentError(f"agent {name}: {exc.message}", method=name, error=str(exc)) from exc

    async def create_sandbox(self, *, sandbox_id: str = "", hostname: str = "", dns: Sequence[str] = (),
                             storages: Sequence[Storage | Mapping[str, Any]] = (),
                             timeout: float | None = None) -> None:
        """AgentService.CreateSandbox: hostname, resolv.conf and sandbox-wide storages in the guest.

        A storage is a :class:`Storage` or a mapping of its fields.
        """
        request = agent_pb2.CreateSandboxRequest(
            sandbox_id=sandbox_id, hostname=hostname, dns=list(dns), storages=[_storage_pb(s) for s in storages])
        await self._call_agent("CreateSandbox", request, empty_pb2.Empty, timeout)

    async def create_container(self, container_id: str, spec: Mapping[str, Any] | bytes, *,
                               storages: Sequence[Storage | Mapping[str, Any]] = (),
                               timeout: float | None = None) -> None:
        """AgentService.CreateContainer: ``spec`` is the OCI config (guest paths) as a dict or JSON."""
        request = agent_pb2.CreateContainerRequest(
            container_id=container_id, oci_spec_json=_json_bytes(spec), storages=[_storage_pb(s) for s in storages])
        await self._call_agent("CreateContainer", request, empty_pb2.Empty, timeout)

    async def start_container(self, container_id: str, *, timeout: float | None = None) -> None:
        """AgentService.StartContainer: run the container's process."""
        await self._call_agent("StartContainer", agent_pb2.StartContainerRequest(container_id=container_id),
                               empty_pb2.Empty, timeout)

    async def remove_container(self, container_id: str, *, wait: int = 0, timeout: float | None = None) -> None:
        """AgentService.RemoveContainer: kill every process (the guest waits ``wait`` s, 0: forever), delete.

        ``timeout`` is the call's deadline; with ``wait`` > 0 it should be larger.
        """
        request = agent_pb2.RemoveContainerRequest(container_id=container_id, timeout=wait)
        await self._call_agent("RemoveContainer", request, empty_pb2.Empty, timeout)

    async def pause_container(self, container_id: str, *, timeout: float | None = None) -> None:
        """AgentService.PauseContainer: freeze every process of the container."""
        await self._call_agent("PauseContainer", agent_pb2.PauseContainerRequest(container_id=container_id),
                               empty_pb2.Empty, timeout)

    async def resume_container(self, container_id: str, *, timeout: float | None = None) -> None:
        """AgentService.ResumeContainer: thaw them."""
        await self._call_agent("ResumeContainer", agent_pb2.ResumeContainerRequest(container_id=container_id),
                               empty_pb2.Empty, timeout)

    async def stats_container(self, container_id: str, *, timeout: float | None = None) -> ContainerStats:
        """AgentService.StatsContainer: the container's cgroup v2 counters."""
        reply: Any = await self._call_agent("StatsContainer", agent_pb2.StatsContainerRequest(
            container_id=container_id), agent_pb2.StatsContainerResponse, timeout)
        return convert.stats_from_pb(reply)

    async def update_container(self, container_id: str, resources: Mapping[str, Any] | bytes, *,
                               timeout: float | None = None) -> None:
        """AgentService.UpdateContainer: new OCI LinuxResources (dict or JSON)."""
        request = agent_pb2.UpdateContainerRequest(container_id=container_id, resources_json=_json_bytes(resources))
        await self._call_agent("UpdateContainer", request, empty_pb2.Empty, timeout)

    async def exec_process(self, container_id: str, exec_id: str, process: Mapping[str, Any] | bytes, *,
                           timeout: float | None = None) -> None:
        """AgentService.ExecProcess: start an OCI process (dict or JSON) in a running container."""
        request = agent_pb2.ExecProcessRequest(container_id=container_id, exec_id=exec_id,
                                               process_json=_json_bytes(process))
        await self._call_agent("ExecProcess", request, empty_pb2.Empty, timeout)

    async def signal_process(self, container_id: str, exec_id: str, signal: int, *, all_processes: bool = False,
                             timeout: float | None = None) -> None:
        """AgentService.SignalProcess: exec id "" is the container's init (``all_processes``: every process)."""
        request = agent_pb2.SignalProcessRequest(container_id=container_id, exec_id=exec_id, signal=int(signal),
                                                 all=all_processes)
        await self._call_agent("SignalProcess", request, empty_pb2.Empty, timeout)

    async def wait_process(self, container_id: str, exec_id: str = "", *, timeout: float | None = NO_TIMEOUT) -> int:
        """AgentService.WaitProcess: the exit status (code, or 128 + signal) once the process exited and
        its output was read to the end. No deadline unless ``timeout`` is given."""
        request = agent_pb2.WaitProcessRequest(container_id=container_id, exec_id=exec_id)
        reply: Any = await self._call_agent("WaitProcess", request, agent_pb2.WaitProcessResponse, timeout)
        return int(reply.status)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes, *, timeout: float | None = None) -> int:
        """AgentService.WriteStdin: all of ``data`` (the guest waits while the pipe is full)."""
        request = agent_pb2.WriteStreamRequest(container_id=container_id, exec_id=exec_id, data=data)
        reply: Any = await self._call_agent("WriteStdin", request, agent_pb2.WriteStreamResponse, timeout)
        return int(reply.len)

    async def read_stdout(self, container_id: str, exec_id: str = "", size: int = 65536, *,
                          timeout: float | None = NO_TIMEOUT) -> bytes:
        """AgentService.ReadStdout: up to ``size`` bytes, waiting for some; b"" at end of stream."""
        return await self._read("ReadStdout", container_id, exec_id, size, timeout)

    async def read_stderr(self, container_id: str, exec_id: str = "", size: int = 65536, *,
                          timeout: float | None = NO_TIMEOUT) -> bytes:
        """AgentService.ReadStderr: like :meth:`read_stdout` (a terminal process has none: b"")."""
        return await self._read("ReadStderr", container_id, exec_id, size, timeout)

    async def _read(self, method: str, container_id: str, exec_id: str, size: int, timeout: float | None) -> bytes:
        request = agent_pb2.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=size)
        reply: Any = await self._call_agent(method, request, agent_pb2.ReadStreamResponse, timeout)
        return bytes(reply.data)

    async def read_all(self, container_id: str, exec_id: str = "", *, stderr: bool = False,
                       timeout: float | None = NO_TIMEOUT) -> bytes:
        """Read a stream to its end."""
        chunks = []
        while chunk := await (self.read_stderr if stderr else self.read_stdout)(
                container_id, exec_id, timeout=timeout):
            chunks.append(chunk)
        return b"".join(chunks)

    async def close_stdin(self, container_id: str, exec_id: str = "", *, timeout: float | None = None) -> None:
        """AgentService.CloseStdin: end of input (a terminal gets its EOF character)."""
        await self._call_agent("CloseStdin", agent_pb2.CloseStdinRequest(container_id=container_id, exec_id=exec_id),
                               empty_pb2.Empty, timeout)

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int, columns: int, *,
                             timeout: float | None = None) -> None:
        """AgentService.TtyWinResize: the terminal's window size."""
        request = agent_pb2.TtyWinResizeRequest(container_id=container_id, exec_id=exec_id, row=rows, column=columns)
        await self._call_agent("TtyWinResize", request, empty_pb2.Empty, timeout)

    async def get_oom_event(self, *, timeout: float | None = NO_TIMEOUT) -> str:
        """AgentService.GetOOMEvent: blocks until a container hits its memory limit; its id."""
        reply: Any = await self._call_agent("GetOOMEvent", agent_pb2.GetOOMEventRequest(), agent_pb2.OOMEvent,
                                            timeout)
        return str(reply.container_id)

    # ---- networking

    async def update_interface(self, interface: NetInterface, *, timeout: float | None = None) -> NetInterface:
        """AgentService.UpdateInterface: the guest NIC with ``interface.hw_addr`` gets its name, MTU and
        exactly its addresses, and is brought up; the interface as the guest then has it."""
        request = agent_pb2.UpdateInterfaceRequest(interface=convert.interface_to_pb(interface))
        reply: Any = await self._call_agent("UpdateInterface", request, agent_pb2.Interface, timeout)
        return convert.interface_from_pb(reply)

    async def update_routes(self, routes: Sequence[NetRoute], *, timeout: float | None = None) -> tuple[NetRoute, ...]:
        """AgentService.UpdateRoutes: the main table's routes become ``routes`` (the kernel's own
        prefix routes stay); the routes as the guest then has them."""
        pb_routes = agent_pb2.Routes(routes=[convert.route_to_pb(r) for r in routes])
        request = agent_pb2.UpdateRoutesRequest(routes=pb_routes)
        reply: Any = await self._call_agent("UpdateRoutes", request, agent_pb2.Routes, timeout)
        return tuple(convert.route_from_pb(r) for r in reply.routes)

    async def add_arp_neighbors(self, neighbors: Sequence[NetNeighbor], *, timeout: float | None = None) -> None:
        """AgentService.AddARPNeighbors: static neighbour entries (IPv4 ARP and IPv6 NDP)."""
        request = agent_pb2.AddARPNeighborsRequest(
            neighbors=agent_pb2.ARPNeighbors(neighbors=[convert.neighbor_to_pb(n) for n in neighbors]))
        await self._call_agent("AddARPNeighbors", request, empty_pb2.Empty, timeout)

    async def list_interfaces(self, *, timeout: float | None = None) -> tuple[NetInterface, ...]:
        """AgentService.ListInterfaces: every interface of the guest (loopback included)."""
        reply: Any = await self._call_agent("ListInterfaces", agent_pb2.ListInterfacesRequest(),
                                            agent_pb2.Interfaces, timeout)
        return tuple(convert.interface_from_pb(i) for i in reply.interfaces)

    async def list_routes(self, *, timeout: float | None = None) -> tuple[NetRoute, ...]:
        """AgentService.ListRoutes: the guest's main routing table, both families."""
        reply: Any = await self._call_agent("ListRoutes", agent_pb2.ListRoutesRequest(), agent_pb2.Routes, timeout)
        return tuple(convert.route_from_pb(r) for r in reply.routes)


def _json_bytes(value: Mapping[str, Any] | bytes) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def _storage_pb(storage: Storage | Mapping[str, Any]) -> Any:
    if not isinstance(storage, Storage):
        fields = dict(storage)
        for key in ("options", "driver_options"):
            if key in fields:
                fields[key] = tuple(fields[key])
        try:
            storage = Storage(**fields)
        except TypeError as exc:
            raise errors.InvalidArgument(f"bad storage: {exc}", storage=repr(fields)) from exc
    return convert.storage_to_pb(storage)
