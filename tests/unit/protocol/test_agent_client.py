"""AgentClient against a fake agent: dataclasses out, Cocoon errors with the method name."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from cocoon import errors
from cocoon.protocol import convert
from cocoon.protocol.agent_client import AgentClient
from cocoon.protocol.gen.agent.v1 import agent_pb2
from cocoon.protocol.ttrpc import Server, UnixTransport
from cocoon.protocol.types import PROTOCOL_VERSION, GuestDetails, HealthStatus, VersionInfo

DETAILS = GuestDetails(
    kernel_release="6.1.0-18-cloud-amd64", kernel_version="#1 SMP Debian", memory_total_bytes=512 << 20,
    cpu_count=2, agent_version="0.1.0", capabilities=("virtio-fs", "oom-events"), init_daemon=True,
)


class FakeAgent:
    def __init__(self) -> None:
        self.clock: dt.datetime | None = None
        self.slow = False

    async def Check(self, request, ctx):
        return convert.health_to_pb(HealthStatus.SERVING)

    async def Version(self, request, ctx):
        if self.slow:
            await asyncio.sleep(10)
        return convert.version_to_pb(VersionInfo("0.1.0", PROTOCOL_VERSION))

    async def GetGuestDetails(self, request, ctx):
        return convert.guest_details_to_pb(DETAILS)

    async def SetGuestDateTime(self, request, ctx):
        if request.sec < 0:
            raise errors.InvalidArgument("time before the Epoch", sec=request.sec)
        self.clock = convert.datetime_from_pb(request)
        from google.protobuf import empty_pb2

        return empty_pb2.Empty()


@pytest.fixture
async def agent(sock_dir, no_leaks):
    fake = FakeAgent()
    server = Server()
    server.register_service(agent_pb2.DESCRIPTOR.services_by_name["Health"], fake)
    server.register_service("cocoon.agent.v1.AgentService", fake)
    await server.serve_unix(sock_dir / "agent.sock")
    client = await AgentClient.connect(UnixTransport(sock_dir / "agent.sock"), timeout=2)
    yield client, fake
    await client.close()
    await server.close()


async def test_typed_calls_return_dataclasses(agent):
    client, fake = agent
    assert await client.check() is HealthStatus.SERVING
    assert await client.version() == VersionInfo("0.1.0", PROTOCOL_VERSION)
    assert await client.guest_details() == DETAILS
    when = dt.datetime(2024, 5, 1, 12, 30, 15, 250_000, tzinfo=dt.UTC)
    await client.set_guest_datetime(when)
    assert fake.clock == when
    await client.set_guest_datetime()
    assert fake.clock is not None and abs((fake.clock - dt.datetime.now(dt.UTC)).total_seconds()) < 5


async def test_errors_become_agent_errors_with_the_method(agent):
    client, fake = agent
    with pytest.raises(errors.AgentError) as info:
        await client.set_guest_datetime(dt.datetime(1969, 1, 1, tzinfo=dt.UTC))
    assert info.value.method == "AgentService/SetGuestDateTime"
    assert info.value.code == "INVALID_ARGUMENT"
    assert "time before the Epoch" in str(info.value)
    fake.slow = True
    with pytest.raises(errors.AgentTimeout) as timeout:
        await client.version(timeout=0.05)
    assert timeout.value.method == "Health/Version"


async def test_unreachable_agent(sock_dir):
    with pytest.raises(errors.AgentError, match="connect to agent"):
        await AgentClient.connect(UnixTransport(sock_dir / "none.sock"))


async def test_closed_connection_is_an_agent_error(sock_dir, no_leaks):
    server = Server()
    server.register_service(agent_pb2.DESCRIPTOR.services_by_name["Health"], FakeAgent())
    await server.serve_unix(sock_dir / "a.sock")
    client = await AgentClient.connect(UnixTransport(sock_dir / "a.sock"))
    await server.close()
    with pytest.raises(errors.AgentError) as info:
        await client.check()
    assert info.value.method == "Health/Check"
    await client.close()


def test_conversions_round_trip():
    assert convert.guest_details_from_pb(convert.guest_details_to_pb(DETAILS)) == DETAILS
    info = VersionInfo("1.2.3", PROTOCOL_VERSION)
    assert convert.version_from_pb(convert.version_to_pb(info)) == info
    for status in HealthStatus:
        assert convert.health_from_pb(convert.health_to_pb(status)) is status
    when = dt.datetime(2001, 9, 9, 1, 46, 40, 999_999, tzinfo=dt.UTC)
    message = convert.datetime_to_pb(when)
    assert (message.sec, message.usec) == (1_000_000_000, 999_999)
    assert convert.datetime_from_pb(message) == when
