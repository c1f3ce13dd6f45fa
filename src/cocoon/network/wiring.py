"""Wiring each pod interface to a tap the VMM gets as an fd: the ``tcfilter`` and ``macvtap`` models.

``tcfilter`` (the default, as Kata's): a tap ``tap<i>_cocoon`` is created in the pod's namespace
with the interface's MTU; an ingress qdisc on both the interface and the tap, each with a u32
match-all filter whose action is ``mirred egress redirect`` to the other. Every frame the CNI's
veth receives leaves through the tap into the VM and back: the namespace's own IP stack never
sees them, and the interface's MAC (the guest NIC's too) is what the CNI's bridge expects.

``macvtap``: a macvtap ``mtap<i>_cocoon`` in *passthru* mode on the interface (it takes over the
lower device and inherits its MAC, so nothing has to be restored afterwards); its character
device ``/dev/tap<ifindex>`` is the queue fd. ``none``: no NIC at all.

Everything made here is owned by an ExitStack and undone on exit or on any failure, in reverse
order: the filters and qdiscs, the macvtap link, our tap fd (a non-persistent tap goes away with
its last fd, the VMM's copy included). The CNI's interface itself is never changed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal

from cocoon.errors import CocoonError, InvalidArgument, NetworkError
from cocoon.log import get_logger
from cocoon.network.discover import PodNetworkInfo
from cocoon.network.netns import netlink_socket, open_macvtap, open_tap
from cocoon.protocol.types import NetInterface

log = get_logger("network")

NetModel = Literal["tcfilter", "macvtap", "none"]
MODELS: tuple[str, ...] = ("tcfilter", "macvtap", "none")
INGRESS = 0xFFFF0000  # "ffff:"
ETH_P_ALL = 0x0003
MACVLAN_MODE_PASSTHRU = 8


@dataclass(frozen=True)
class WiredInterface:
    """One pod interface and the queue fd the VMM uses for it (``device``: the tap or macvtap)."""

    interface: NetInterface
    fd: int
    device: str


def tap_name(i: int) -> str:
    return f"tap{i}_cocoon"


def macvtap_name(i: int) -> str:
    return f"mtap{i}_cocoon"


def _nl_error(action: str, exc: Exception, **context: Any) -> NetworkError:
    code = getattr(exc, "code", None)
    return NetworkError(f"{action}: {exc}", errno=os.strerror(code) if isinstance(code, int) else None, **context)


class _Ip:
    """pyroute2 IPRoute inside the pod's namespace, closed with the stack."""

    def __init__(self, netns: str, stack: ExitStack) -> None:
        from pyroute2 import IPRoute  # lazy: only sandboxes with a network pay for it

        self.netns = netns
        self.ipr: Any = stack.enter_context(IPRoute(fileno=netlink_socket(netns).detach()))

    def index(self, name: str) -> int:
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise NetworkError("interface vanished from the namespace", netns=self.netns, interface=name)
        return int(found[0])

    def redirect_ingress(self, stack: ExitStack, src: int, dst: int, src_name: str, dst_name: str) -> None:
        """Ingress qdisc on ``src`` with a match-all filter redirecting every frame out of ``dst``."""
        try:
            self.ipr.tc("add", "ingress", src, "ffff:")
        except Exception as exc:
            raise _nl_error("add ingress qdisc", exc, netns=self.netns, interface=src_name,
                            hint="the interface already has an ingress qdisc") from exc  # fmt: skip
        stack.callback(self._del_ingress, src, src_name)
        try:
            self.ipr.tc("add-filter", "u32", src, ":1", parent="ffff:", protocol=ETH_P_ALL, keys=["0x0/0x0+0"],
                        target=0x10000,
                        action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": dst})
        except Exception as exc:
            raise _nl_error("add redirect filter", exc, netns=self.netns, interface=src_name, target=dst_name) from exc

    def _del_ingress(self, index: int, name: str) -> None:
        try:
            self.ipr.tc("del", "ingress", index, "ffff:")
        except Exception as exc:  # the interface may be gone (netns deleted): nothing left to undo
            log.debug("ingress qdisc already gone", netns=self.netns, interface=name, error=str(exc))


def _wire_tcfilter(ip: _Ip, stack: ExitStack, i: int, iface: NetInterface, index: int) -> WiredInterface:
    name = tap_name(i)
    fd = open_tap(ip.netns, name)
    stack.callback(os.close, fd)
    tap = ip.index(name)
    try:
        ip.ipr.link("set", index=tap, mtu=iface.mtu, state="up")
    except Exception as exc:
        raise _nl_error("set tap up", exc, netns=ip.netns, interface=name) from exc
    ip.redirect_ingress(stack, index, tap, iface.name, name)
    ip.redirect_ingress(stack, tap, index, name, iface.name)
    return WiredInterface(iface, fd, name)


def _wire_macvtap(ip: _Ip, stack: ExitStack, i: int, iface: NetInterface, index: int) -> WiredInterface:
    name = macvtap_name(i)
    try:
        ip.ipr.link("add", ifname=name, kind="macvtap", link=index, macvtap_mode="passthru")
    except Exception as exc:
        raise _nl_error("create macvtap", exc, netns=ip.netns, interface=name, link=iface.name) from exc
    mtap = ip.index(name)
    stack.callback(_delete_link, ip, mtap, name)
    try:
        ip.ipr.link("set", index=mtap, mtu=iface.mtu, state="up")
    except Exception as exc:
        raise _nl_error("set macvtap up", exc, netns=ip.netns, interface=name) from exc
    fd = open_macvtap(ip.netns, name, mtap)
    stack.callback(os.close, fd)
    return WiredInterface(iface, fd, name)


def _delete_link(ip: _Ip, index: int, name: str) -> None:
    try:
        ip.ipr.link("del", index=index)
    except Exception as exc:
        log.debug("link already gone", netns=ip.netns, interface=name, error=str(exc))


@contextlib.contextmanager
def wired(info: PodNetworkInfo, model: str) -> Iterator[list[WiredInterface]]:
    """Wire every interface of ``info`` with ``model``; undone when the block is left (blocking).

    NetworkError names the namespace and the interface that could not be wired; whatever was
    already wired is undone before it is raised.
    """
    if model not in MODELS:
        raise InvalidArgument("unknown network model", field="runtime.internetworking_model", value=model)
    with ExitStack() as stack:
        if model == "none" or not info.interfaces:
            if info.interfaces:
                log.warning("network model none: the VM gets no NIC", netns=info.netns,
                            interfaces=",".join(i.name for i in info.interfaces))  # fmt: skip
            yield []
            return
        ip = _Ip(info.netns, stack)
        out = []
        for i, (iface, index) in enumerate(zip(info.interfaces, info.indexes, strict=True)):
            try:
                wire = _wire_tcfilter if model == "tcfilter" else _wire_macvtap
                out.append(wire(ip, stack, i, iface, index))
            except CocoonError as exc:
                exc.add_context(netns=info.netns, model=model)
                raise
            log.info("interface wired", netns=info.netns, interface=iface.name, device=out[-1].device, model=model)
        yield out
