"""The guest's network, configured as the host found the pod's (Kata's network RPCs).

The host gives every pod interface to the VM as a virtio-net NIC with the interface's MAC, so
the guest finds each NIC by MAC, gives it the pod's name, MTU and addresses
(:meth:`GuestNetwork.update_interface`), then the routes (:meth:`update_routes`) and the static
neighbours (:meth:`add_neighbors`). Raw rtnetlink (:mod:`cocoon.agent.netlink`): no ``ip``
process per change, and the same code runs on the host in a test's network namespace.

Errors are Cocoon errors naming the interface: NotFound (no NIC with that MAC),
InvalidArgument (a bad address, prefix or route), ProcessError (the kernel refused; ``errno``).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable, Sequence

from cocoon.agent import netlink as nl
from cocoon.errors import InvalidArgument, NotFound, ProcessError
from cocoon.log import get_logger
from cocoon.protocol.types import IPAddress, IPFamily, NetInterface, NetNeighbor, NetRoute

log = get_logger("agent")


def _family(value: int) -> IPFamily:
    return IPFamily.V6 if value == socket.AF_INET6 else IPFamily.V4


def is_link_local(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_link_local
    except ValueError:
        return False


def check_address(addr: IPAddress, interface: str) -> IPAddress:
    """A valid address and prefix length, else InvalidArgument naming the interface."""
    try:
        ip = ipaddress.ip_address(addr.address)
    except ValueError:
        raise InvalidArgument("bad IP address", interface=interface, address=addr.address) from None
    if not 0 <= addr.prefix_len <= ip.max_prefixlen:
        raise InvalidArgument("bad prefix length", interface=interface, address=str(addr))
    return IPAddress(str(ip), addr.prefix_len)


def route_order(routes: Iterable[NetRoute]) -> list[NetRoute]:
    """Routes without a gateway first: a gateway must be reachable when its route is added."""
    return sorted(routes, key=lambda r: (bool(r.gateway), r.family, r.dest))


def _kernel_error(action: str, exc: OSError, **context: object) -> ProcessError:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return ProcessError(f"{action}: {exc.strerror}", errno=code, **context)


class GuestNetwork:
    """Interfaces, routes and neighbours of one network namespace (the guest's, in the VM)."""

    def __init__(self, link: nl.Netlink | None = None) -> None:
        self._nl = link

    @property
    def rt(self) -> nl.Netlink:
        if self._nl is None:
            self._nl = nl.Netlink()
        return self._nl

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    # -- reading -----------------------------------------------------------------------------
    def list_interfaces(self) -> list[NetInterface]:
        """Every link with its addresses (IPv6 link-local ones included), loopback too."""
        addrs = self.rt.addresses()
        return [
            NetInterface(name=link.name, hw_addr=link.hw_addr, mtu=link.mtu, kind=link.kind, device=link.name,
                         flags=link.flags,
                         addresses=tuple(IPAddress(a.address, a.prefix_len) for a in addrs if a.index == link.index))
            for link in self.rt.links()
        ]  # fmt: skip

    def list_routes(self) -> list[NetRoute]:
        """The main table's unicast routes of both families."""
        names = {link.index: link.name for link in self.rt.links()}
        return [
            NetRoute(dest=r.dst, family=_family(r.family), gateway=r.gateway, device=names.get(r.oif, ""),
                     source=r.prefsrc, scope=r.scope)
            for r in self.rt.routes()
            if r.table == nl.RT_TABLE_MAIN and r.kind == nl.RTN_UNICAST
        ]  # fmt: skip

    def _link_by_mac(self, hw_addr: str, name: str) -> nl.Link:
        for link in self.rt.links():
            if link.hw_addr == hw_addr.lower():
                return link
        raise NotFound("no network interface with this MAC in the guest", interface=name, hw_addr=hw_addr)

    # -- changing ----------------------------------------------------------------------------
    def loopback_up(self) -> None:
        """Bring ``lo`` up (containers share the guest's network namespace and expect it)."""
        for link in self.rt.links():
            if link.flags & nl.IFF_LOOPBACK and not link.flags & nl.IFF_UP:
                self.rt.set_link(link.index, up=True)
                log.info("loopback up", interface=link.name)

    def update_interface(self, iface: NetInterface) -> NetInterface:
        """The NIC with ``iface.hw_addr``: renamed to ``iface.name``, its MTU, exactly its addresses, up."""
        name = iface.name
        if not name or len(name.encode()) > 15 or "/" in name or name.strip() != name:
            raise InvalidArgument("bad interface name", field="name", interface=name)
        wanted = [check_address(a, name) for a in iface.addresses]
        link = self._link_by_mac(iface.hw_addr, name)
        try:
            if link.name != name:
                self._free_name(name, link.index)
                self.rt.set_link(link.index, up=False)
                self.rt.set_link(link.index, name=name)
            if iface.mtu and iface.mtu != link.mtu:
                self.rt.set_link(link.index, mtu=iface.mtu)
            self.rt.set_link(link.index, up=True)
            have = {(a.address, a.prefix_len) for a in self.rt.addresses(link.index)}
            want = {(a.address, a.prefix_len) for a in wanted}
            for address, plen in sorted(have - want):
                if not is_link_local(address):
                    self.rt.del_address(link.index, address, plen)
            for a in wanted:
                if (a.address, a.prefix_len) not in have:
                    self.rt.add_address(link.index, a.address, a.prefix_len)
        except OSError as exc:
            raise _kernel_error("update interface", exc, interface=name, hw_addr=iface.hw_addr) from exc
        log.info("interface configured", interface=name, hw_addr=iface.hw_addr, mtu=iface.mtu,
                 addresses=",".join(map(str, wanted)))  # fmt: skip
        return next(i for i in self.list_interfaces() if i.hw_addr == link.hw_addr)

    def _free_name(self, name: str, keep: int) -> None:
        """Another link already called ``name`` (the guest's own eth0 order) is renamed out of the way."""
        for other in self.rt.links():
            if other.name == name and other.index != keep:
                self.rt.set_link(other.index, up=False)
                self.rt.set_link(other.index, name=f"cocoon{other.index}")

    def update_routes(self, routes: Sequence[NetRoute]) -> list[NetRoute]:
        """The main table becomes ``routes``, plus the kernel's own prefix routes of the addresses.

        Routes of loopback and the kernel's are kept; every other main-table route goes first.
        """
        names = {link.name: link.index for link in self.rt.links()}
        nets = {}
        for r in routes:
            try:
                nets[r] = ipaddress.ip_network(r.dest, strict=False)
            except ValueError:
                raise InvalidArgument("bad route destination", dest=r.dest, interface=r.device) from None
            if r.device and r.device not in names:
                raise NotFound("route names an interface the guest does not have", interface=r.device, dest=r.dest)
        try:
            for entry in self.rt.routes():
                if (entry.table == nl.RT_TABLE_MAIN and entry.kind == nl.RTN_UNICAST
                        and entry.protocol != nl.RTPROT_KERNEL and entry.oif != names.get("lo")):  # fmt: skip
                    self.rt.del_route(entry)
            for r in route_order(routes):
                net = nets[r]
                family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
                scope = r.scope or (nl.RT_SCOPE_UNIVERSE if r.gateway or family == socket.AF_INET6
                                    else nl.RT_SCOPE_LINK)  # fmt: skip
                self.rt.add_route(family, str(net.network_address), net.prefixlen, gateway=r.gateway,
                                  oif=names.get(r.device, 0), prefsrc=r.source, scope=scope)  # fmt: skip
        except OSError as exc:
            raise _kernel_error("update routes", exc, routes=len(routes)) from exc
        log.info("routes configured", routes=len(routes))
        return self.list_routes()

    def add_neighbors(self, neighbors: Sequence[NetNeighbor]) -> None:
        """Static ARP/NDP entries (replacing any for the same address)."""
        names = {link.name: link.index for link in self.rt.links()}
        for n in neighbors:
            index = names.get(n.device)
            if index is None:
                raise NotFound("neighbour names an interface the guest does not have", interface=n.device, ip=n.ip)
            try:
                ipaddress.ip_address(n.ip)
                self.rt.add_neighbor(index, n.ip, n.lladdr, n.state or nl.NUD_PERMANENT, n.flags)
            except ValueError as exc:
                raise InvalidArgument(f"bad neighbour: {exc}", interface=n.device, ip=n.ip) from None
            except OSError as exc:
                raise _kernel_error("add neighbour", exc, interface=n.device, ip=n.ip) from exc
        if neighbors:
            log.info("neighbours added", neighbors=len(neighbors))
