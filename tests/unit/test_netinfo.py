"""`cocoon network ID`: formatting, argument parsing, state checks, and the call path through a
control socket that answers ListInterfaces/ListRoutes as a monitor forwards them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cocoon import config
from cocoon.api.netinfo import SandboxNetwork, route_line, sandbox_network
from cocoon.api.state import ContainerState, StateStore, Status, process_start_time
from cocoon.cli.parser import build_parser
from cocoon.errors import NotFound, StateError
from cocoon.protocol import convert
from cocoon.protocol.gen.agent.v1 import agent_pb2
from cocoon.protocol.types import IPAddress, IPFamily, NetInterface, NetRoute

LO = NetInterface("lo", "00:00:00:00:00:00", 65536, (IPAddress("127.0.0.1", 8), IPAddress("::1", 128)), flags=0x49)
ETH0 = NetInterface("eth0", "52:54:00:12:34:56", 1450, (IPAddress("10.88.0.5", 16), IPAddress("fd88::5", 64)),
                    flags=0x1043)  # fmt: skip
DOWN = NetInterface("eth1", "52:54:00:00:00:01", 1500, flags=0x1002)
ROUTES = (
    NetRoute("0.0.0.0/0", IPFamily.V4, gateway="10.88.0.1", device="eth0"),
    NetRoute("10.88.0.0/16", IPFamily.V4, device="eth0", source="10.88.0.5", scope=253),
    NetRoute("::/0", IPFamily.V6, gateway="fd88::1", device="eth0"),
)


def test_route_lines_read_like_ip_route():
    assert [route_line(r) for r in ROUTES] == [
        "default via 10.88.0.1 dev eth0",
        "10.88.0.0/16 dev eth0 scope link src 10.88.0.5",
        "-6 default via fd88::1 dev eth0",
    ]


def test_table_lists_interfaces_and_routes():
    text = SandboxNetwork("c1", (LO, ETH0, DOWN), ROUTES).to_table()
    lines = text.splitlines()
    assert lines[0].split() == ["INTERFACE", "MAC", "MTU", "STATE", "ADDRESSES"]
    assert lines[1].split() == ["lo", "00:00:00:00:00:00", "65536", "up", "127.0.0.1/8", "::1/128"]
    assert lines[2].split() == ["eth0", "52:54:00:12:34:56", "1450", "up", "10.88.0.5/16", "fd88::5/64"]
    assert lines[3].split() == ["eth1", "52:54:00:00:00:01", "1500", "down", "-"]
    assert lines[5] == "ROUTES" and lines[6] == "  default via 10.88.0.1 dev eth0"
    assert SandboxNetwork("c1", (LO,), ()).to_table().endswith("ROUTES\n  (none)")


def test_json_shape():
    doc = SandboxNetwork("c1", (LO, ETH0), ROUTES).to_dict()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["id"] == "c1"
    assert doc["interfaces"][0] == {"name": "lo", "mac": "00:00:00:00:00:00", "mtu": 65536, "up": True,
                                    "loopback": True, "kind": "", "addresses": ["127.0.0.1/8", "::1/128"]}  # fmt: skip
    assert doc["interfaces"][1]["loopback"] is False and doc["interfaces"][1]["mtu"] == 1450
    assert doc["routes"][1] == {"dest": "10.88.0.0/16", "family": "ipv4", "gateway": "", "device": "eth0",
                                "source": "10.88.0.5", "scope": "link"}  # fmt: skip
    assert doc["routes"][2]["dest"] == "default" and doc["routes"][2]["family"] == "ipv6"


def test_parser():
    args = build_parser().parse_args(["--root", "/r", "network", "-f", "json", "c1"])
    assert (args.command, args.format, args.id, args.root) == ("network", "json", "c1", "/r")
    assert build_parser().parse_args(["network", "c1"]).format == "table"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["network", "-f", "yaml", "c1"])


@pytest.fixture
def cfg(tmp_path) -> config.Config:
    base = config.load(None)
    return dataclasses.replace(base, runtime=dataclasses.replace(base.runtime, root=str(tmp_path / "root")))


def test_refuses_a_stopped_or_unknown_container(cfg):
    store = StateStore(cfg.runtime.root)
    store.create(ContainerState.new("c1", bundle="/b", rootfs="/b/rootfs"))
    store.save(store.load("c1").replace(status=Status.STOPPED))
    with pytest.raises(StateError, match="cannot show the network of container c1: it is stopped") as err:
        sandbox_network(cfg, "c1")
    assert err.value.context["state"] == "stopped"
    with pytest.raises(NotFound):
        sandbox_network(cfg, "nope")


class _Guest:
    """Answers the two calls over ttrpc on a unix socket, as a monitor forwarding to an agent does."""

    async def ListInterfaces(self, request, ctx):
        return agent_pb2.Interfaces(interfaces=[convert.interface_to_pb(i) for i in (LO, ETH0)])

    async def ListRoutes(self, request, ctx):
        return agent_pb2.Routes(routes=[convert.route_to_pb(r) for r in ROUTES])


@pytest.fixture
def control_socket(tmp_path) -> Iterator[Path]:
    from cocoon.protocol.ttrpc import Server

    path = tmp_path / "monitor.sock"
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    server = Server()
    guest = _Guest()
    server.register("cocoon.agent.v1.AgentService", "ListInterfaces", agent_pb2.ListInterfacesRequest,
                    guest.ListInterfaces)  # fmt: skip
    server.register("cocoon.agent.v1.AgentService", "ListRoutes", agent_pb2.ListRoutesRequest, guest.ListRoutes)

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve_unix(str(path)))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield path
    asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_asks_the_monitor(cfg, control_socket):
    store = StateStore(cfg.runtime.root)
    store.create(ContainerState.new("c1", bundle="/b", rootfs="/b/rootfs"))
    me = os.getpid()
    store.save(store.load("c1").replace(status=Status.RUNNING, pid=me, pid_start_time=process_start_time(me) or 0,
                                        monitor_socket=str(control_socket)))  # fmt: skip
    net = sandbox_network(cfg, "c1")
    assert net.interfaces == (LO, ETH0) and net.routes == ROUTES
