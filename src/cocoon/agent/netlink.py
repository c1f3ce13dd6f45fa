"""A minimal rtnetlink client on the ``socket`` module: links, addresses, routes, neighbours.

The guest agent imports only the standard library and protobuf, so it cannot use pyroute2; the
few messages it needs are packed here with :mod:`struct`. A :class:`Netlink` socket belongs to
the network namespace of the thread that created it, whatever thread uses it later (tests run
the same code on the host in a namespace of their own).

Message layouts (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/neighbour.h)::

    nlmsghdr  len:u32 type:u16 flags:u16 seq:u32 pid:u32
    ifinfomsg family:u8 pad:u8 type:u16 index:i32 flags:u32 change:u32
    ifaddrmsg family:u8 prefixlen:u8 flags:u8 scope:u8 index:u32
    rtmsg     family:u8 dst_len:u8 src_len:u8 tos:u8 table:u8 protocol:u8 scope:u8 type:u8 flags:u32
    ndmsg     family:u8 pad1:u8 pad2:u16 ifindex:i32 state:u16 flags:u8 type:u8
    rtattr    len:u16 type:u16 data (each padded to 4 bytes)
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH = 28

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO = 1, 3, 4, 18
IFLA_INFO_KIND = 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_NODAD, IFA_F_PERMANENT = 0x02, 0x80
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 7, 15
NDA_DST, NDA_LLADDR = 1, 2

IFF_UP, IFF_LOOPBACK = 0x1, 0x8
RT_TABLE_MAIN = 254
RTPROT_KERNEL, RTPROT_BOOT = 2, 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST = 0, 253, 254
RTN_UNICAST = 1
NUD_PERMANENT = 0x80

_HDR = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BBHiHBB")
_RTA = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, data: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    length = _RTA.size + len(data)
    return _RTA.pack(length, kind) + data + b"\0" * (_align(length) - length)


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """rtattrs -> {type: payload}; the last of a repeated type wins (nested types are masked)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + _RTA.size <= len(data):
        length, kind = _RTA.unpack_from(data, pos)
        if length < _RTA.size:
            break
        out[kind & 0x7FFF] = data[pos + _RTA.size : pos + length]
        pos += _align(length)
    return out


def cstr(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode(errors="replace")


def mac_str(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def mac_bytes(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {text!r}")
    return bytes(int(p, 16) for p in parts)


def family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def ip_bytes(address: str) -> bytes:
    return socket.inet_pton(family_of(address), address)


def ip_str(family: int, data: bytes) -> str:
    return socket.inet_ntop(family, data)


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    hw_addr: str
    mtu: int
    flags: int
    kind: str


@dataclass(frozen=True)
class Addr:
    index: int
    family: int
    address: str
    prefix_len: int
    flags: int
    scope: int


@dataclass(frozen=True)
class RouteEntry:
    family: int
    dst: str  # CIDR
    gateway: str
    oif: int
    prefsrc: str
    scope: int
    protocol: int
    table: int
    kind: int  # RTN_*


class NetlinkError(OSError):
    """The kernel refused a request: ``errno`` is its error."""


class Netlink:
    """One NETLINK_ROUTE socket (of the creating thread's network namespace)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self.seq += 1
        self.sock.send(_HDR.pack(_HDR.size + len(body), kind, flags | NLM_F_REQUEST, self.seq, 0) + body)
        return self.seq

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        """(type, body) of each answer to ``seq`` until DONE or the ACK; NetlinkError on an error."""
        while True:
            data = self.sock.recv(1 << 16)
            pos = 0
            while pos + _HDR.size <= len(data):
                length, kind, flags, mseq, _ = _HDR.unpack_from(data, pos)
                body = data[pos + _HDR.size : pos + length]
                pos += _align(length)
                if mseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0]
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return
                yield kind, body
                if not flags & NLM_F_MULTI:
                    return

    def request(self, kind: int, body: bytes, flags: int = 0) -> None:
        """A change (NEW/DEL...) acknowledged by the kernel; NetlinkError if refused."""
        for _ in self._replies(self._send(kind, flags | NLM_F_ACK, body)):
            pass

    def dump(self, kind: int, body: bytes) -> list[tuple[int, bytes]]:
        return list(self._replies(self._send(kind, NLM_F_DUMP, body)))

    # -- links -------------------------------------------------------------------------------
    def links(self) -> list[Link]:
        out = []
        for _, body in self.dump(RTM_GETLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            _, _, index, flags, _ = _IFINFO.unpack_from(body)
            attrs = parse_attrs(body[_IFINFO.size :])
            info = parse_attrs(attrs.get(IFLA_LINKINFO, b""))
            out.append(Link(
                index=index, name=cstr(attrs.get(IFLA_IFNAME, b"")), hw_addr=mac_str(attrs.get(IFLA_ADDRESS, b"")),
                mtu=struct.unpack("=I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0, flags=flags,
                kind=cstr(info.get(IFLA_INFO_KIND, b"")),
            ))  # fmt: skip
        return out

    def set_link(self, index: int, *, up: bool | None = None, mtu: int = 0, name: str = "") -> None:
        """Change one link: administrative state, MTU, name (renaming needs the link down)."""
        flags = change = 0
        if up is not None:
            flags, change = (IFF_UP if up else 0), IFF_UP
        attrs = b""
        if mtu:
            attrs += attr(IFLA_MTU, struct.pack("=I", mtu))
        if name:
            attrs += attr(IFLA_IFNAME, name.encode() + b"\0")
        self.request(RTM_NEWLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change) + attrs)

    # -- addresses ---------------------------------------------------------------------------
    def addresses(self, index: int = 0) -> list[Addr]:
        out = []
        for _, body in self.dump(RTM_GETADDR, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            family, plen, flags, scope, idx = _IFADDR.unpack_from(body)
            if index and idx != index:
                continue
            attrs = parse_attrs(body[_IFADDR.size :])
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if IFA_FLAGS in attrs:
                flags = struct.unpack("=I", attrs[IFA_FLAGS])[0]
            out.append(Addr(idx, family, ip_str(family, raw), plen, flags, scope))
        return out

    def _addr_msg(self, index: int, address: str, prefix_len: int) -> bytes:
        family, raw = family_of(address), ip_bytes(address)
        flags = IFA_F_PERMANENT | (IFA_F_NODAD if family == socket.AF_INET6 else 0)
        body = _IFADDR.pack(family, prefix_len, flags & 0xFF, RT_SCOPE_UNIVERSE, index)
        body += attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw) + attr(IFA_FLAGS, struct.pack("=I", flags))
        return body

    def add_address(self, index: int, address: str, prefix_len: int) -> None:
        """Add an address; IPv6 ones skip duplicate address detection (the pod's IPAM owns them)."""
        self.request(RTM_NEWADDR, self._addr_msg(index, address, prefix_len), NLM_F_CREATE | NLM_F_REPLACE)

    def del_address(self, index: int, address: str, prefix_len: int) -> None:
        self.request(RTM_DELADDR, self._addr_msg(index, address, prefix_len))

    # -- routes ------------------------------------------------------------------------------
    def routes(self) -> list[RouteEntry]:
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for _, body in self.dump(RTM_GETROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
                fam, dst_len, _, _, table, proto, scope, kind, _ = _RTMSG.unpack_from(body)
                attrs = parse_attrs(body[_RTMSG.size :])
                if RTA_TABLE in attrs:
                    table = struct.unpack("=I", attrs[RTA_TABLE])[0]
                zero = "0.0.0.0" if fam == socket.AF_INET else "::"  # noqa: S104
                dst = ip_str(fam, attrs[RTA_DST]) if RTA_DST in attrs else zero
                out.append(RouteEntry(
                    family=fam, dst=f"{dst}/{dst_len}",
                    gateway=ip_str(fam, attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else "",
                    oif=struct.unpack("=i", attrs[RTA_OIF])[0] if RTA_OIF in attrs else 0,
                    prefsrc=ip_str(fam, attrs[RTA_PREFSRC]) if RTA_PREFSRC in attrs else "",
                    scope=scope, protocol=proto, table=table, kind=kind,
                ))  # fmt: skip
        return out

    def _route_msg(self, family: int, dst: str, prefix_len: int, *, gateway: str = "", oif: int = 0,
                   prefsrc: str = "", scope: int = RT_SCOPE_UNIVERSE, protocol: int = RTPROT_BOOT) -> bytes:
        body = _RTMSG.pack(family, prefix_len, 0, 0, RT_TABLE_MAIN, protocol, scope, RTN_UNICAST, 0)
        if prefix_len:
            body += attr(RTA_DST, ip_bytes(dst))
        if gateway:
            body += attr(RTA_GATEWAY, ip_bytes(gateway))
        if oif:
            body += attr(RTA_OIF, struct.pack("=i", oif))
        if prefsrc:
            body += attr(RTA_PREFSRC, ip_bytes(prefsrc))
        return body

    def add_route(self, family: int, dst: str, prefix_len: int, **kw: object) -> None:
        self.request(RTM_NEWROUTE, self._route_msg(family, dst, prefix_len, **kw),  # type: ignore[arg-type]
                     NLM_F_CREATE | NLM_F_REPLACE)  # fmt: skip

    def del_route(self, entry: RouteEntry) -> None:
        dst, _, plen = entry.dst.partition("/")
        body = _RTMSG.pack(entry.family, int(plen), 0, 0, entry.table if entry.table < 256 else 0, entry.protocol,
                           entry.scope, entry.kind, 0)  # fmt: skip
        if int(plen):
            body += attr(RTA_DST, ip_bytes(dst))
        if entry.gateway:
            body += attr(RTA_GATEWAY, ip_bytes(entry.gateway))
        if entry.oif:
            body += attr(RTA_OIF, struct.pack("=i", entry.oif))
        if entry.table >= 256:
            body += attr(RTA_TABLE, struct.pack("=I", entry.table))
        try:
            self.request(RTM_DELROUTE, body)
        except NetlinkError as exc:
            if exc.errno != errno.ESRCH:  # gone with its address or link already
                raise

    # -- neighbours --------------------------------------------------------------------------
    def add_neighbor(self, index: int, address: str, lladdr: str, state: int, flags: int = 0) -> None:
        body = _NDMSG.pack(family_of(address), 0, 0, index, state, flags, 0)
        body += attr(NDA_DST, ip_bytes(address)) + attr(NDA_LLADDR, mac_bytes(lladdr))
        self.request(RTM_NEWNEIGH, body, NLM_F_CREATE | NLM_F_REPLACE)
