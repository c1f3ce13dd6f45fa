"""Wiring each pod interface to a tap the VMM gets as an fd: the ``tcfilter`` and ``macvtap`` models.

``tcfilter`` (the default, as Kata's): a tap ``tap<i>_cocoon`` is created in the pod's namespace
with the interface's MTU; an ingress qdisc on both the interface and the tap, each with a u32
match-all filter whose action is ``mirred egress redirect`` to the other. Every frame the CNI's
veth receives leaves through the tap into the VM and back: the namespace's own IP stack never
sees them, and the interface's MAC (the guest NIC's too) is what the CNI's bridge expects.

``macvtap``: a macvtap ``mtap<i>_cocoon`` in *passthru* mode on the interface (it takes over the
lower device and inherits its MAC, so nothing has to be restored afterwards); its character
device ``/dev/tap<ifindex>`` is the queue fd. That node is host-wide while ifindexes are per
namespace: each macvtap gets an ifindex whose node is free (>= 4096), chosen under a host-wide
lock. ``none``: no NIC at all.

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

from cocoon.errors import CocoonError, InvalidArgument, NetworkError, NotFound
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


#: macvtaps get ifindexes from here up: their queue node ``/dev/tap<ifindex>`` is host-wide while
#: ifindexes are per namespace, so two pods' macvtaps with the default (equal) ifindex would share
#: one node, the second sandbox opening the first one's queue.
MACVTAP_FIRST_INDEX = 4096
MACVTAP_LOCK = "/run/lock/cocoon-macvtap.lock"


@contextlib.contextmanager
def _macvtap_lock() -> Iterator[None]:
    """Host-wide: between choosing a free ``/dev/tap<N>`` and opening it, no other cocoon takes N."""
    import fcntl

    os.makedirs(os.path.dirname(MACVTAP_LOCK), exist_ok=True)
    fd = os.open(MACVTAP_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def free_tap_index(first: int = MACVTAP_FIRST_INDEX, dev: str = "/dev") -> int:
    """The lowest ifindex >= ``first`` whose queue node ``<dev>/tap<N>`` nobody has."""
    n = first
    while os.path.exists(f"{dev}/tap{n}"):
        n += 1
    return n


def _wire_macvtap(ip: _Ip, stack: ExitStack, i: int, iface: NetInterface, index: int) -> WiredInterface:
    name = macvtap_name(i)
    with _macvtap_lock():
        mtap = free_tap_index()
        try:
            ip.ipr.link("add", ifname=name, kind="macvtap", link=index, macvtap_mode="passthru", index=mtap)
        except Exception as exc:
            raise _nl_error("create macvtap", exc, netns=ip.netns, interface=name, link=iface.name) from exc
        stack.callback(_delete_link, ip, mtap, name)
        if ip.index(name) != mtap:
            raise NetworkError("macvtap did not get the ifindex asked for", netns=ip.netns, interface=name,
                               wanted=mtap, got=ip.index(name))  # fmt: skip
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


def _wire(ip: _Ip, stack: ExitStack, model: str, number: int, found: tuple[NetInterface, int]) -> WiredInterface:
    iface, index = found
    try:
        wire = _wire_tcfilter if model == "tcfilter" else _wire_macvtap
        out = wire(ip, stack, number, iface, index)
    except CocoonError as exc:
        exc.add_context(netns=ip.netns, model=model)
        raise
    log.info("interface wired", netns=ip.netns, interface=iface.name, device=out.device, model=model)
    return out


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise InvalidArgument("unknown network model", field="runtime.internetworking_model", value=model)


@contextlib.contextmanager
def wired(info: PodNetworkInfo, model: str) -> Iterator[list[WiredInterface]]:
    """Wire every interface of ``info`` with ``model``; undone when the block is left (blocking).

    NetworkError names the namespace and the interface that could not be wired; whatever was
    already wired is undone before it is raised.
    """
    _check_model(model)
    with ExitStack() as stack:
        if model == "none" or not info.interfaces:
            if info.interfaces:
                log.warning("network model none: the VM gets no NIC", netns=info.netns,
                            interfaces=",".join(i.name for i in info.interfaces))  # fmt: skip
            yield []
            return
        ip = _Ip(info.netns, stack)
        yield [_wire(ip, stack, model, i, found) for i, found in enumerate(zip(info.interfaces, info.indexes,
                                                                                 strict=True))]  # fmt: skip


@contextlib.contextmanager
def wired_one(info: PodNetworkInfo, name: str, model: str, number: int) -> Iterator[WiredInterface]:
    """Wire only the interface called ``name`` of ``info``, as number ``number`` (its tap is
    ``tap<number>_cocoon``): for an interface added while the VM runs. Undone when the block is left.

    NotFound if the namespace has no such interface, InvalidArgument for the ``none`` model.
    """
    _check_model(model)
    if model == "none":
        raise InvalidArgument("network model none: no NIC to add", field="runtime.internetworking_model",
                              netns=info.netns, interface=name)  # fmt: skip
    for found in zip(info.interfaces, info.indexes, strict=True):
        if found[0].name == name:
            break
    else:
        raise NotFound("no such interface in the pod's network namespace", netns=info.netns, interface=name,
                       found=",".join(i.name for i in info.interfaces) or "(none)")  # fmt: skip
    with ExitStack() as stack:
        yield _wire(_Ip(info.netns, stack), stack, model, number, found)
