"""Interfaces added to (and removed from) a running pod: the network hot-plug of a sandbox.

A CNI plugin may add an interface to the pod's network namespace while the pod runs (a second
network, say). :meth:`PodInterfaces.add` then does, for that one interface, what a sandbox's
start does for all of them (docs/networking.md): wire it to a tap or macvtap, hot-plug a
virtio-net NIC with its MAC and MTU into the VM (the hypervisor's :meth:`hotplug_nic`), wait for
the guest kernel to see the NIC, and have the agent give it the interface's name and addresses,
the routes (the guest's table is re-synced with every wired interface's routes) and its static
neighbours. :meth:`PodInterfaces.remove` unplugs the NIC (the guest releases it first) and
undoes the wiring. Whatever fails on the way is undone before the error is raised; what is still
plugged when the sandbox stops is unwired by :meth:`PodInterfaces.close`, after the VM is gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cocoon.api.pod_network import PodNetwork, Undo, attach_interface
from cocoon.config import Config
from cocoon.errors import AlreadyExists, CocoonError, InvalidArgument, NotFound
from cocoon.hypervisors.base import Hypervisor, NetDevice
from cocoon.log import get_logger
from cocoon.protocol.types import NetInterface

if TYPE_CHECKING:
    from cocoon.protocol.agent_client import AgentClient

log = get_logger("network")

#: Seconds the guest kernel may take to show a hot-plugged NIC (pciehp + virtio-net probe).
NIC_APPEAR_TIMEOUT = 15.0
#: Seconds the guest may take to release a NIC (Linux's pciehp waits 5 s after the button press).
NIC_RELEASE_TIMEOUT = 20.0


@dataclass(frozen=True)
class _Plugged:
    interface: NetInterface
    nic: NetDevice
    undo: Undo


class PodInterfaces:
    """The interfaces of a sandbox's network namespace that were wired while it ran.

    ``boot`` is what the sandbox wired at start (its interfaces keep their NICs; they are not
    hot-pluggable). Not safe for concurrent calls: the sandbox serializes them.
    """

    def __init__(self, cfg: Config, netns: str, *, sandbox: str, boot: PodNetwork | None) -> None:
        self.cfg = cfg
        self.netns = netns
        self.sandbox = sandbox
        self._boot = boot
        self._plugged: dict[str, _Plugged] = {}
        self._next = len(boot.nics) if boot is not None else 0  # number of the next NIC (net<N>, tap<N>_cocoon)

    @property
    def names(self) -> tuple[str, ...]:
        """Every wired interface: those of the start, then the hot-plugged ones in order."""
        boot = tuple(i.name for i in self._boot.interfaces) if self._boot is not None else ()
        return (*boot, *self._plugged)

    def _context(self, name: str) -> dict[str, Any]:
        return {"sandbox": self.sandbox, "netns": self.netns, "interface": name}

    async def add(self, vm: Hypervisor, agent: AgentClient, name: str) -> NetInterface:
        """Wire ``name``, hot-plug its NIC, configure it in the guest; the guest's view of it."""
        ctx = self._context(name)
        if name in self.names:
            raise AlreadyExists("interface is wired to the VM already", **ctx)
        if not vm.capabilities().hotplug or not vm.spec.hotplug_slots:
            raise InvalidArgument("the VM has no hot-plug slots", field="hypervisor.qemu.hotplug_slots",
                                  hint="set [hypervisor.qemu] hotplug_slots > 0 (before the sandbox starts)",
                                  **ctx)  # fmt: skip
        started = time.monotonic()
        try:
            net, undo = await attach_interface(self.cfg, self.netns, name, self._next)
        except CocoonError as exc:
            exc.add_context(**ctx)
            raise
        self._next += 1  # taken for good from here: QEMU's ids of a NIC the guest keeps outlive our undo
        nic, iface = net.nics[0], net.interfaces[0]
        plugged = False
        try:
            await vm.hotplug_nic(nic)
            plugged = True
            got = await self._configure(agent, net)
        except BaseException as exc:
            if isinstance(exc, CocoonError):
                exc.add_context(**ctx)
            try:
                if plugged:
                    await vm.unplug_nic(nic.id, timeout=NIC_RELEASE_TIMEOUT)
            except CocoonError as undo_exc:  # the first error is the one to report
                log.warning("cannot unplug the NIC of a failed hot-plug", nic=nic.id, error=str(undo_exc), **ctx)
            finally:
                await undo()
            raise
        self._plugged[name] = _Plugged(iface, nic, undo)
        log.info("interface hot-plugged", nic=nic.id, hw_addr=iface.hw_addr,
                 seconds=round(time.monotonic() - started, 3), **ctx)  # fmt: skip
        return got

    async def _configure(self, agent: AgentClient, net: PodNetwork) -> NetInterface:
        iface = net.interfaces[0]
        await wait_for_macs(agent, [iface.hw_addr])
        got = await agent.update_interface(iface)
        # UpdateRoutes sets the whole main table: every wired interface's routes, as the namespace has them now.
        names = {*self.names, iface.name}
        routes = [r for r in net.info.routes if r.device in names]
        if routes:
            await agent.update_routes(routes)
        neighbors = [n for n in net.info.neighbors if n.device == iface.name]
        if neighbors:
            await agent.add_arp_neighbors(neighbors)
        return got

    async def _unplug(self, vm: Hypervisor, nic: NetDevice, name: str) -> None:
        try:
            await vm.unplug_nic(nic.id, timeout=NIC_RELEASE_TIMEOUT)
        except CocoonError as exc:
            exc.add_context(**self._context(name))
            raise

    async def remove(self, vm: Hypervisor, name: str) -> None:
        """Unplug the NIC of hot-plugged interface ``name`` and undo its wiring (the guest's
        addresses and routes on it go with the NIC). The wiring is undone even if the guest does
        not release the NIC in time (then the error is raised afterwards)."""
        found = self._plugged.get(name)
        if found is None:
            if name in self.names:  # one of the start's: its NIC sits on a bus without hot-plug
                raise InvalidArgument("only interfaces added while the sandbox runs can be removed",
                                      **self._context(name))  # fmt: skip
            raise NotFound("no hot-plugged interface of that name", plugged=",".join(self._plugged) or "(none)",
                           **self._context(name))  # fmt: skip
        started = time.monotonic()
        try:
            await self._unplug(vm, found.nic, name)
        finally:
            del self._plugged[name]
            await found.undo()
        log.info("interface removed", nic=found.nic.id, seconds=round(time.monotonic() - started, 3),
                 **self._context(name))  # fmt: skip

    async def close(self) -> None:
        """Undo the wiring of every interface still plugged (the VM is gone by now: nothing to unplug)."""
        while self._plugged:
            name, plugged = self._plugged.popitem()
            try:
                await plugged.undo()
            except CocoonError as exc:
                log.warning("cannot unwire a hot-plugged interface", error=str(exc), **self._context(name))
            else:
                log.debug("hot-plugged interface unwired", **self._context(name))


async def wait_for_macs(agent: AgentClient, macs: Iterable[str], timeout: float = NIC_APPEAR_TIMEOUT) -> None:
    """Until the guest lists a NIC for each MAC: the guest kernel shows a hot-plugged NIC a moment
    after the VMM added it (pciehp, virtio-net probe). NotFound after ``timeout``."""
    wanted = {m.lower() for m in macs}
    deadline = time.monotonic() + timeout
    while True:
        missing = wanted - {i.hw_addr.lower() for i in await agent.list_interfaces()}
        if not missing:
            return
        if time.monotonic() > deadline:
            raise NotFound("the guest did not show the hot-plugged NIC in time", hw_addr=",".join(sorted(missing)),
                           timeout=timeout)  # fmt: skip
        await asyncio.sleep(0.05)
