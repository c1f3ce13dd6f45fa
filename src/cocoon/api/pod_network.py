"""A sandbox's network: the pod namespace's interfaces wired to the VM, then configured in the guest.

Two steps around the VM's boot, used by :class:`cocoon.api.sandbox.Sandbox` and the CLI's
monitor alike:

1. :func:`attach` (before the VM starts): discover what the CNI plugin left in the namespace,
   wire each interface to a tap or macvtap (``runtime.internetworking_model``), and return the
   NICs for the VM spec. Undone by the caller's AsyncExitStack (after the VM is gone).
2. :func:`configure_guest` (after CreateSandbox, before any container): the agent gives each
   NIC the interface's name, MTU and addresses, then the routes and static neighbours.

The netlink work blocks (pyroute2, setns threads): it runs in one worker thread of its own for
the whole life of the wiring (pyroute2's sockets keep per-thread state: set up and torn down
from the same thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from cocoon.config import Config
from cocoon.errors import CocoonError
from cocoon.hypervisors.base import NetDevice
from cocoon.log import get_logger
from cocoon.oci.model import Spec
from cocoon.protocol.agent_client import AgentClient
from cocoon.protocol.types import NetInterface

if TYPE_CHECKING:
    from cocoon.network import PodNetworkInfo

log = get_logger("network")
T = TypeVar("T")
W = TypeVar("W")
#: Undoes a wiring (blocking work in its worker thread); safe to await once.
Undo = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class PodNetwork:
    """The wired pod network: what the guest must configure and the NICs the VM gets."""

    netns: str
    model: str
    interfaces: tuple[NetInterface, ...]
    nics: tuple[NetDevice, ...]
    info: PodNetworkInfo  # routes and neighbours too


def spec_netns(spec: Spec) -> str:
    """The network namespace path a container's OCI spec names: "" if none, or if it is the host's
    own (``docker --network host``): a VM cannot share the host's network stack, it keeps its own
    (loopback only) and nothing of the host is touched."""
    from cocoon.network.netns import is_host_netns

    ns = spec.linux.network_namespace if spec.linux is not None else None
    if ns is None or not ns.path:
        return ""
    if is_host_netns(ns.path):
        log.info("host network asked for: the VM keeps its own network stack", netns=ns.path)
        return ""
    return ns.path


def wants_new_netns(spec: Spec) -> bool:
    """True if the spec asks for a new network namespace (a ``network`` entry without a path)."""
    ns = spec.linux.network_namespace if spec.linux is not None else None
    return ns is not None and not ns.path


async def attach(stack: AsyncExitStack, cfg: Config, netns: str, *, sandbox: str = "") -> PodNetwork:
    """Discover and wire the namespace at ``netns``; the wiring is undone when ``stack`` closes.

    Errors (NotFound, InvalidArgument, NetworkError) name the namespace and the interface; a
    failure leaves nothing of ours in the namespace.
    """
    from cocoon.network import wired

    started = time.monotonic()
    model = cfg.runtime.internetworking_model
    info, wires, undo = await _wire_in_worker(netns, lambda info: wired(info, model))
    # Undone after the VM stopped (the stack unwinds in reverse): filters, macvtaps, our fds.
    stack.push_async_callback(undo)
    nics = tuple(NetDevice(id=f"net{i}", fd=w.fd, mac=w.interface.hw_addr, mtu=w.interface.mtu)
                 for i, w in enumerate(wires))  # fmt: skip
    log.info("pod network wired", sandbox=sandbox, netns=netns, model=model, nics=len(nics),
             seconds=round(time.monotonic() - started, 3))  # fmt: skip
    return PodNetwork(netns=netns, model=model, interfaces=tuple(w.interface for w in wires), nics=nics, info=info)


async def attach_interface(cfg: Config, netns: str, name: str, number: int) -> tuple[PodNetwork, Undo]:
    """Wire only the interface ``name`` of the namespace (one a CNI plugin added while the pod
    runs) as NIC number ``number`` (``net<number>``, tap ``tap<number>_cocoon``).

    Returns it as a one-NIC :class:`PodNetwork` (``info``: the whole namespace, freshly read)
    and the coroutine function that undoes the wiring. NotFound if there is no such interface;
    a failure leaves nothing of ours in the namespace.
    """
    from cocoon.network import wired_one

    model = cfg.runtime.internetworking_model
    info, wire, undo = await _wire_in_worker(netns, lambda info: wired_one(info, name, model, number))
    nic = NetDevice(id=f"net{number}", fd=wire.fd, mac=wire.interface.hw_addr, mtu=wire.interface.mtu)
    return PodNetwork(netns=netns, model=model, interfaces=(wire.interface,), nics=(nic,), info=info), undo


async def _wire_in_worker(
    netns: str, wiring: Callable[[PodNetworkInfo], AbstractContextManager[W]]
) -> tuple[PodNetworkInfo, W, Undo]:
    """Discover ``netns``, enter ``wiring(info)``, both in a worker thread of their own that also
    undoes it (pyroute2 sockets keep per-thread state); the wiring and its undo coroutine function."""
    from cocoon.network import discover

    loop = asyncio.get_running_loop()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pod-network")
    sync = contextlib.ExitStack()

    async def undo() -> None:
        try:
            await _shielded(loop.run_in_executor(worker, sync.close))
        finally:
            worker.shutdown(wait=False)

    try:
        info = await _shielded(loop.run_in_executor(worker, discover, netns))
        wires = await _shielded(loop.run_in_executor(worker, sync.enter_context, wiring(info)))
    except BaseException:
        await undo()
        raise
    return info, wires, undo


async def _shielded(fut: asyncio.Future[T]) -> T:
    """Wait for a worker's job even if cancelled meanwhile: half-made wiring must be known to undo it."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await fut
        raise


async def configure_guest(agent: AgentClient, net: PodNetwork, *, sandbox: str = "") -> None:
    """Interfaces, then routes, then neighbours, in the guest (only those of wired interfaces)."""
    info = net.info
    names = {i.name for i in net.interfaces}
    try:
        for iface in net.interfaces:
            await agent.update_interface(iface)
        routes = [r for r in info.routes if r.device in names]
        if routes:
            await agent.update_routes(routes)
        neighbors = [n for n in info.neighbors if n.device in names]
        if neighbors:
            await agent.add_arp_neighbors(neighbors)
    except CocoonError as exc:
        exc.add_context(netns=net.netns)
        raise
    log.info("guest network configured", sandbox=sandbox, interfaces=len(net.interfaces), routes=len(info.routes))
