"""The narrow hypervisor interface every VMM driver implements, and its registry.

A driver subclasses :class:`Hypervisor` with a ``name`` and is found by
:func:`get_driver`. Drivers are imported lazily (the CLI's fast paths never load
one). A VM object is an async context manager: leaving the block always stops
the VMM and removes its sockets, whatever happened inside.

Lifecycle (guarded by :meth:`Hypervisor._require`)::

    NEW -> STARTING -> RUNNING <-> PAUSED
                 \\          \\        /
                  +--------> STOPPED <+
"""

from __future__ import annotations

import enum
import importlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Literal, Self

from cocoon.errors import HypervisorError, NotFound, StateError

AccelName = Literal["kvm", "tcg"]
ChannelKind = Literal["virtio-serial", "vsock"]


class VMState(enum.StrEnum):
    """Lifecycle of one VM."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class AgentChannel:
    """How the host reaches the guest agent."""

    kind: ChannelKind
    path: str = ""  # unix socket of the virtio-serial chardev
    cid: int = 0  # vsock guest CID
    port: int = 0  # vsock port


@dataclass(frozen=True)
class SharedDir:
    """A host directory exported to the guest by a vhost-user-fs daemon (virtiofsd) on ``socket``."""

    tag: str
    socket: Path


@dataclass(frozen=True)
class NetDevice:
    """A virtio-net NIC backed by an open tap (or macvtap) queue fd the VMM inherits.

    ``mac`` and ``mtu`` are the pod interface's: the guest finds its NIC by that MAC. The fd
    stays owned by the caller (closed after the VM stopped).
    """

    id: str
    fd: int
    mac: str
    mtu: int = 1500


@dataclass(frozen=True)
class VMSpec:
    """What to boot. Drivers turn this into their own command line."""

    sandbox_id: str
    workdir: Path  # sockets, console log, pid file: owned by the VM while it runs
    kernel: Path
    initrd: Path
    memory_mib: int = 256
    vcpus: int = 1
    accel: AccelName = "tcg"
    channel: ChannelKind = "virtio-serial"
    kernel_params: tuple[str, ...] = ()
    machine: str = ""
    binary: str = ""
    vsock_cid: int = 0
    vsock_port: int = 1024
    tcg_tb_size_mib: int = 32
    boot_timeout: float = 30.0  # seconds until the agent must open its channel
    shared_memory: bool = False  # memfd/shared RAM, needed by vhost-user devices (virtio-fs)
    shared_dirs: tuple[SharedDir, ...] = ()  # virtio-fs shares (imply shared_memory)
    nics: tuple[NetDevice, ...] = ()  # virtio-net devices on tap fds passed to the VMM
    hotplug_slots: int = 0  # free slots for devices added while the VM runs (0: no hot-plug)
    memory_file: Path | None = None  # guest RAM in this file, mapped shared (templates and their clones)
    incoming: Path | None = None  # restore this saved state instead of booting (a template's clone)
    extra_args: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do; callers check before asking."""

    pause: bool = True
    hotplug: bool = False
    snapshot: bool = False
    vsock: bool = False
    virtio_fs: bool = False
    block: bool = False


class Hypervisor(ABC):
    """One VM driven by one VMM process."""

    name: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type[Hypervisor]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            Hypervisor._registry[cls.name] = cls

    def __init__(self, spec: VMSpec) -> None:
        self.spec = spec
        self.state = VMState.NEW

    def _require(self, *states: VMState, action: str) -> None:
        if self.state not in states:
            raise StateError(
                f"cannot {action} a VM that is {self.state}",
                sandbox=self.spec.sandbox_id,
                state=str(self.state),
                required="|".join(str(s) for s in states),
            )

    @classmethod
    @abstractmethod
    def capabilities(cls) -> Capabilities:
        """What this driver supports on this host."""

    @property
    @abstractmethod
    def pid(self) -> int | None:
        """Host PID of the VMM process while it runs."""

    @property
    @abstractmethod
    def agent_channel(self) -> AgentChannel:
        """Where the host connects to reach the guest agent."""

    @abstractmethod
    async def start(self) -> None:
        """Start the VMM and wait until the guest agent channel opens (BootError otherwise)."""

    @abstractmethod
    async def stop(self, *, timeout: float = 5.0) -> int | None:
        """Stop the VMM: wait up to ``timeout`` for the guest to power off, then kill. Idempotent."""

    @abstractmethod
    async def pause(self) -> None:
        """Freeze every vCPU."""

    @abstractmethod
    async def resume(self) -> None:
        """Thaw every vCPU."""

    @abstractmethod
    def console_tail(self, lines: int = 30) -> str:
        """The last lines the guest printed on its console."""

    @abstractmethod
    async def hotplug_nic(self, nic: NetDevice) -> None:
        """Add a virtio-net NIC on ``nic.fd`` to the running VM (the VMM gets its own copy of the fd).

        HypervisorError when the VM was started without free hot-plug slots or the VMM refuses;
        nothing of the NIC is left in the VMM then.
        """

    @abstractmethod
    async def unplug_nic(self, nic_id: str, *, timeout: float = 20.0) -> None:
        """Remove a NIC added by :meth:`hotplug_nic`: ask the guest to release it, wait up to
        ``timeout`` for that, then drop the VMM's end of the tap. HypervisorError if the guest does
        not release it in time (the VMM's tap end is dropped all the same)."""

    @abstractmethod
    async def hotplug_fs(self, share: SharedDir) -> None:
        """Add a virtio-fs device for ``share`` (its vhost-user daemon listening already) to the
        running VM: how a template's clone gets its shares. HypervisorError without a free slot."""

    @abstractmethod
    async def agent_handover(self, close: Callable[[], Awaitable[None]]) -> None:
        """Run ``close`` (the host closing its agent connection) and return once the guest agent
        waits for the next host: the state a template must be saved in."""

    @abstractmethod
    async def save(self, state_file: Path) -> None:
        """Pause the VM and write its device state to ``state_file``; the RAM stays in
        ``spec.memory_file``. A spec with ``incoming=state_file`` and a copy of that memory file
        restores it. The VM is paused afterwards: stop it."""

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop(timeout=0)
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop(timeout=0 if et is not None else 5.0)


# Drivers live in their own modules, imported only when asked for.
_DRIVER_MODULES = {"qemu": "cocoon.hypervisors.qemu"}


def driver_names() -> Iterable[str]:
    return sorted(_DRIVER_MODULES)


def get_driver(name: str) -> type[Hypervisor]:
    """The driver class registered as ``name`` (imports its module on first use)."""
    module = _DRIVER_MODULES.get(name)
    if module is None:
        raise NotFound(f"unknown hypervisor driver {name!r}", known=",".join(driver_names()))
    importlib.import_module(module)
    try:
        return Hypervisor._registry[name]
    except KeyError:  # pragma: no cover - a module that does not register itself is a bug
        raise HypervisorError("driver module did not register", driver=name) from None
