"""The agent API as served inside the guest (Health + AgentService over ttRPC).

Each RPC is an async method named like the protobuf RPC; the ttRPC server answers
UNIMPLEMENTED for the ones not written yet. Errors raised here are Cocoon errors
and cross the VM boundary with their meaning (NotFound -> NOT_FOUND, ...).
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
from cocoon.agent import facts
from cocoon.errors import InvalidArgument, ProcessError
from cocoon.log import get_logger
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
    """cocoon.agent.v1.AgentService (the sandbox-level RPCs; container RPCs arrive with the CLI)."""

    def __init__(self, server: AgentServer) -> None:
        self.server = server

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

    async def DestroySandbox(self, request: Any, ctx: ServerContext) -> Any:
        log.info("destroy sandbox: powering off")
        # Answer first; the power-off happens once the reply is on the wire.
        asyncio.get_running_loop().call_later(0.01, self.server.request_shutdown)
        return empty_pb2.Empty()


class AgentServer:
    """The ttRPC server with both services, and the agent's life cycle."""

    def __init__(self, *, in_guest: bool) -> None:
        self.in_guest = in_guest
        self.started = time.monotonic()
        self.server = Server()
        self.server.register_service(agent_pb2.DESCRIPTOR.services_by_name["Health"], HealthService())
        self.server.register_service(agent_pb2.DESCRIPTOR.services_by_name["AgentService"], AgentService(self))
        self._stop = asyncio.Event()

    def request_shutdown(self) -> None:
        self._stop.set()

    async def _run_until_stopped(self) -> None:
        await self._stop.wait()
        await self.server.shutdown(grace=1.0)

    async def serve_unix(self, path: str) -> None:
        await self.server.serve_unix(path)
        log.info("agent serving", channel=f"unix:{path}")
        await self._run_until_stopped()

    async def serve_vsock(self, port: int) -> None:
        await self.server.serve_vsock(port)
        log.info("agent serving", channel=f"vsock:{port}")
        await self._run_until_stopped()

    async def serve_chardev(self, path: str) -> None:
        await self.server.serve_chardev(path)
        log.info("agent serving", channel=path, ready_ms=round((time.monotonic() - self.started) * 1000))
        await self._run_until_stopped()
