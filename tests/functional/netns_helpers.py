"""Test network namespaces made with pyroute2: a "pod" namespace (what a CNI plugin leaves: a veth
with addresses and default routes) and a "peer" namespace holding the veth's other end (the
host/bridge side). No traffic ever leaves these two namespaces. Always removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

from pyroute2 import IPRoute, netns

NETNS_DIR = "/run/netns"


def _off_loop(fn):
    """pyroute2's sync API cannot run inside a running event loop (async tests): a thread."""
    import concurrent.futures
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(fn, *args, **kw).result()

    return wrapper


@dataclass
class PodNet:
    """Names and addresses of one test topology."""

    pod: str  # namespace names (files under /run/netns)
    peer: str
    pod_if: str = "eth0"
    peer_if: str = "veth-peer"
    pod_v4: str = "10.77.0.2"
    peer_v4: str = "10.77.0.1"
    pod_v6: str = "fd77::2"
    peer_v6: str = "fd77::1"
    v4: bool = True
    v6: bool = True
    mtu: int = 1500
    extra: list[str] = field(default_factory=list)

    @property
    def pod_path(self) -> str:
        return f"{NETNS_DIR}/{self.pod}"

    @property
    def peer_path(self) -> str:
        return f"{NETNS_DIR}/{self.peer}"

    @_off_loop
    def pod_mac(self) -> str:
        with IPRoute(netns=self.pod, flags=0) as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=self.pod_if)[0])[0]
            return str(link.get("IFLA_ADDRESS"))

    def in_peer(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """Run a host program inside the peer namespace (nsenter, not `ip netns exec`: HOST-NOTES)."""
        return subprocess.run(["nsenter", f"--net={self.peer_path}", *argv], capture_output=True, text=True,
                              check=False, **kw)  # type: ignore[call-overload]

    def in_pod(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", f"--net={self.pod_path}", *argv], capture_output=True, text=True,
                              check=False, **kw)  # type: ignore[call-overload]


@_off_loop
def _remove(name: str) -> None:
    with contextlib.suppress(Exception):
        netns.remove(name)


@contextlib.contextmanager
def pod_network(tag: str, *, v4: bool = True, v6: bool = True, mtu: int = 1500,
                neighbor: bool = False) -> Iterator[PodNet]:
    """A pod netns with a veth (addresses, default routes), its peer end in a peer netns."""
    suffix = f"{tag}-{os.getpid()}"
    net = PodNet(pod=f"cpod-{suffix}", peer=f"cpeer-{suffix}", v4=v4, v6=v6, mtu=mtu)
    _off_loop(netns.create)(net.pod)
    try:
        _off_loop(_make)(net, mtu, v4, v6, neighbor)
        yield net
    finally:
        _remove(net.peer)
        _remove(net.pod)


def _make(net: PodNet, mtu: int, v4: bool, v6: bool, neighbor: bool) -> None:
    netns.create(net.peer)
    with IPRoute(netns=net.peer, flags=0) as peer:
        peer.link("add", ifname=net.peer_if, kind="veth", peer={"ifname": net.pod_if, "net_ns_fd": net.pod})
        idx = peer.link_lookup(ifname=net.peer_if)[0]
        peer.link("set", index=idx, mtu=mtu, state="up")
        peer.link("set", index=peer.link_lookup(ifname="lo")[0], state="up")
        if v4:
            peer.addr("add", index=idx, address=net.peer_v4, prefixlen=24)
        if v6:
            peer.addr("add", index=idx, address=net.peer_v6, prefixlen=64, flags=0x02)  # IFA_F_NODAD
    with IPRoute(netns=net.pod, flags=0) as pod:
        idx = pod.link_lookup(ifname=net.pod_if)[0]
        pod.link("set", index=idx, mtu=mtu, state="up")
        if v4:
            pod.addr("add", index=idx, address=net.pod_v4, prefixlen=24)
            pod.route("add", dst="0.0.0.0/0", gateway=net.peer_v4)
        if v6:
            pod.addr("add", index=idx, address=net.pod_v6, prefixlen=64, flags=0x02)
            pod.route("add", dst="::/0", gateway=net.peer_v6, family=socket.AF_INET6)
        if neighbor and v4:
            pod.neigh("add", dst="10.77.0.99", lladdr="02:00:00:00:00:99", ifindex=idx, state=0x80)


@_off_loop
def add_link(ns_name: str, **spec: object) -> None:
    """Add a link inside namespace ``ns_name`` (a dummy, a bridge, a veth pair...)."""
    with IPRoute(netns=ns_name, flags=0) as ipr:
        ipr.link("add", **spec)


@_off_loop
def links_of(ns_name: str) -> dict[str, str]:
    """name -> kind of every link in the namespace."""
    with IPRoute(netns=ns_name, flags=0) as ipr:
        return {str(lk.get("IFLA_IFNAME")): str(lk.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"))
                for lk in ipr.get_links()}  # fmt: skip


@_off_loop
def qdiscs_of(ns_name: str) -> list[tuple[str, str]]:
    """(interface, qdisc kind) of every qdisc but the defaults (noqueue/noop)."""
    with IPRoute(netns=ns_name, flags=0) as ipr:
        names = {lk["index"]: str(lk.get("IFLA_IFNAME")) for lk in ipr.get_links()}
        return [(names.get(q["index"], "?"), str(q.get("TCA_KIND"))) for q in ipr.get_qdiscs()
                if q.get("TCA_KIND") not in ("noqueue", "noop", None)]  # fmt: skip
