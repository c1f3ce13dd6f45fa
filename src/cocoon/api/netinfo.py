"""``cocoon network ID``: a sandbox's network as its guest sees it (interfaces, addresses, routes).

The guest is the only place that knows: the agent reads its kernel's links, addresses and main
routing table (``ListInterfaces``/``ListRoutes``), and the container's monitor forwards both calls
from its control socket. Nothing is read on the host: the pod's namespace shows the CNI's view,
which the VM copies, plus our tap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cocoon.api.container import _client, load
from cocoon.config import Config
from cocoon.errors import StateError
from cocoon.protocol.types import IPFamily, NetInterface, NetRoute

IFF_UP, IFF_LOOPBACK = 0x1, 0x8
#: RT_SCOPE_* names, as ``ip route`` prints them.
SCOPES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}


@dataclass(frozen=True, slots=True)
class SandboxNetwork:
    """The guest's interfaces (loopback included) and its main table's routes, both families."""

    id: str
    interfaces: tuple[NetInterface, ...]
    routes: tuple[NetRoute, ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``cocoon network -f json``."""
        return {
            "id": self.id,
            "interfaces": [
                {"name": i.name, "mac": i.hw_addr, "mtu": i.mtu, "up": bool(i.flags & IFF_UP),
                 "loopback": bool(i.flags & IFF_LOOPBACK), "kind": i.kind,
                 "addresses": [str(a) for a in i.addresses]}
                for i in self.interfaces
            ],
            "routes": [
                {"dest": "default" if r.is_default else r.dest, "family": f"ipv{int(r.family)}",
                 "gateway": r.gateway, "device": r.device, "source": r.source,
                 "scope": SCOPES.get(r.scope, str(r.scope))}
                for r in self.routes
            ],
        }  # fmt: skip

    def to_table(self) -> str:
        """Interfaces as a table, then the routes one per line in ``ip route``'s words."""
        rows = [["INTERFACE", "MAC", "MTU", "STATE", "ADDRESSES"]]
        for i in self.interfaces:
            state = "up" if i.flags & IFF_UP else "down"
            rows.append([i.name, i.hw_addr, str(i.mtu), state, " ".join(str(a) for a in i.addresses) or "-"])
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines += ["", "ROUTES"]
        lines += [f"  {route_line(r)}" for r in self.routes] or ["  (none)"]
        return "\n".join(lines)


def route_line(route: NetRoute) -> str:
    """``default via 10.88.0.1 dev eth0`` / ``-6 fd00::/64 dev eth0 scope link src fd00::5``."""
    words = ["-6"] if route.family is IPFamily.V6 else []
    words.append("default" if route.is_default else route.dest)
    if route.gateway:
        words += ["via", route.gateway]
    if route.device:
        words += ["dev", route.device]
    if route.scope:
        words += ["scope", SCOPES.get(route.scope, str(route.scope))]
    if route.source:
        words += ["src", route.source]
    return " ".join(words)


def sandbox_network(cfg: Config, container_id: str) -> SandboxNetwork:
    """Ask the container's guest (through its monitor) for its interfaces and routes.

    The container must be live (created, running or paused): a stopped one has no VM.
    """
    import asyncio

    state = load(cfg, container_id)
    if not state.status.can_kill():  # created, running or paused: its VM is up
        raise StateError(
            f"cannot show the network of container {container_id}: it is {state.status} (no VM)",
            id=container_id, state=str(state.status), required="created, running or paused",
        )  # fmt: skip

    async def go() -> SandboxNetwork:
        client = await _client(state)
        try:
            interfaces = await client.list_interfaces()
            routes = await client.list_routes()
        finally:
            await client.close()
        return SandboxNetwork(container_id, tuple(interfaces), tuple(routes))

    return asyncio.run(go())
