"""What a CNI plugin left in a network namespace: interfaces, addresses, routes, neighbours.

Read with pyroute2 over a netlink socket opened inside the namespace (:mod:`cocoon.network.netns`),
never by parsing ``ip`` output. Blocking: call it from a worker thread (``asyncio.to_thread``).

Kept: every non-loopback interface of a kind we can wire to a VM (veth, macvlan, ipvlan; any
other kind is a NetworkError naming it); its MAC, MTU and addresses (IPv6 link-local ones are
the guest kernel's business); the main table's unicast routes through those interfaces except
the kernel's own prefix routes (the guest's kernel makes the same from the same addresses); and
permanent neighbour entries. Interfaces Cocoon itself created (``tap*_cocoon``, ``mtap*_cocoon``)
are skipped.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cocoon.errors import NetworkError
from cocoon.log import get_logger
from cocoon.network.netns import netlink_socket, refuse_host_netns
from cocoon.protocol.types import NUD_PERMANENT, IPAddress, IPFamily, NetInterface, NetNeighbor, NetRoute

log = get_logger("network")

SUPPORTED_KINDS = frozenset({"veth", "macvlan", "ipvlan"})
OWN_NAME = re.compile(r"^m?tap\d+_cocoon$")
IFF_LOOPBACK = 0x8
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_KERNEL = 2


@dataclass(frozen=True)
class PodNetworkInfo:
    """A pod's network as found in its namespace (``netns`` is the path it was read from)."""

    netns: str
    interfaces: tuple[NetInterface, ...] = ()
    routes: tuple[NetRoute, ...] = ()
    neighbors: tuple[NetNeighbor, ...] = ()
    indexes: tuple[int, ...] = ()  # ifindex of each interface in the namespace, same order


def _family(value: int) -> IPFamily:
    return IPFamily.V6 if value == socket.AF_INET6 else IPFamily.V4


def keep_address(address: str) -> bool:
    """Addresses the guest gets: not IPv6 link-local (the guest kernel makes its own)."""
    ip = ipaddress.ip_address(address)
    return not (ip.version == 6 and ip.is_link_local)


def interfaces_from(links: Iterable[Any], addrs: Iterable[Any], netns: str) -> list[tuple[int, NetInterface]]:
    """pyroute2 link and address messages -> (ifindex, interface) of the ones to wire."""
    by_index: dict[int, list[IPAddress]] = {}
    for a in addrs:
        address = a.get("IFA_LOCAL") or a.get("IFA_ADDRESS")
        if address and keep_address(address):
            by_index.setdefault(a["index"], []).append(IPAddress(address, int(a["prefixlen"])))
    out = []
    for link in links:
        name = link.get("IFLA_IFNAME") or ""
        if link["flags"] & IFF_LOOPBACK or OWN_NAME.match(name):
            continue
        kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or "(none)"
        if kind not in SUPPORTED_KINDS:
            raise NetworkError(f"cannot wire a {kind} interface to the VM (supported: veth, macvlan, ipvlan)",
                               netns=netns, interface=name, kind=kind)  # fmt: skip
        out.append((int(link["index"]), NetInterface(
            name=name, hw_addr=str(link.get("IFLA_ADDRESS") or "").lower(), mtu=int(link.get("IFLA_MTU") or 1500),
            addresses=tuple(by_index.get(link["index"], ())), kind=kind,
        )))  # fmt: skip
    return out


def routes_from(routes: Iterable[Any], names: dict[int, str]) -> list[NetRoute]:
    """pyroute2 route messages -> the routes the guest needs (see the module docstring)."""
    out = []
    for r in routes:
        table = r.get("RTA_TABLE") or r["table"]
        if table != RT_TABLE_MAIN or r["type"] != RTN_UNICAST or r["proto"] == RTPROT_KERNEL:
            continue
        oif = r.get("RTA_OIF")
        if oif not in names:
            if r.get("RTA_MULTIPATH"):
                log.warning("multipath route not copied to the guest", dest=r.get("RTA_DST"))
            continue
        family = _family(r["family"])
        zero = "::" if family is IPFamily.V6 else "0.0.0.0"  # noqa: S104 - a default route's destination
        out.append(NetRoute(
            dest=f"{r.get('RTA_DST') or zero}/{r['dst_len']}", family=family, gateway=r.get("RTA_GATEWAY") or "",
            device=names[oif], source=r.get("RTA_PREFSRC") or "", scope=int(r["scope"]),
        ))  # fmt: skip
    return out


def neighbors_from(neighbours: Iterable[Any], names: dict[int, str]) -> list[NetNeighbor]:
    """Permanent neighbour entries on the wired interfaces."""
    out = []
    for n in neighbours:
        if not n["state"] & NUD_PERMANENT or n["ifindex"] not in names:
            continue
        ip, lladdr = n.get("NDA_DST"), n.get("NDA_LLADDR")
        if ip and lladdr:
            out.append(NetNeighbor(ip=ip, lladdr=str(lladdr).lower(), device=names[n["ifindex"]]))
    return out


def discover(netns: str) -> PodNetworkInfo:
    """Read the pod's network from the namespace at ``netns`` (blocking; see the module docstring).

    NotFound (no such path), InvalidArgument (not a network namespace), NetworkError (an
    interface kind we cannot wire, or netlink failed), each naming the namespace.
    """
    from pyroute2 import IPRoute  # lazy: only sandboxes with a network pay for it

    refuse_host_netns(netns)
    sock = netlink_socket(netns)
    try:
        with IPRoute(fileno=sock.detach()) as ipr:
            found = interfaces_from(ipr.get_links(), ipr.get_addr(), netns)
            names = {index: iface.name for index, iface in found}
            routes = routes_from(ipr.get_routes(family=socket.AF_UNSPEC), names)
            neighbors = neighbors_from(ipr.get_neighbours(), names)
    except NetworkError:
        raise
    except Exception as exc:  # pyroute2's NetlinkError and friends
        raise NetworkError(f"read the pod's network: {exc}", netns=netns) from exc
    info = PodNetworkInfo(netns=netns, interfaces=tuple(i for _, i in found), routes=tuple(routes),
                          neighbors=tuple(neighbors), indexes=tuple(idx for idx, _ in found))  # fmt: skip
    log.info("pod network found", netns=netns, interfaces=",".join(i.name for i in info.interfaces),
             routes=len(info.routes), neighbors=len(info.neighbors))  # fmt: skip
    return info
