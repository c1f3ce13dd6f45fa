"""Pod sandboxes: one VM, several containers. The library API a CRI shim is built on.

    async with Sandbox(cfg, "pod-1", Path("/run/cocoon/pods/pod-1"), memory_mib=512) as sb:
        web = await sb.create_container("web", cocoon.oci.spec.load(bundle))
        await web.start()
        probe = await web.exec("probe-1", {"args": ["cat", "/etc/hostname"], "cwd": "/"})
        out, err, status = await probe.output()

A :class:`Sandbox` owns, for its whole life, the share directory (every container's rootfs and
bind-mount sources, see :mod:`cocoon.api.pod_share`), one virtiofsd exporting it, and one
:class:`~cocoon.api.guest.GuestVM` whose agent mounted the share. Containers are added while it
runs (:meth:`Sandbox.create_container`) and removed one by one or all at once by :meth:`Sandbox.stop`,
which undoes everything in reverse order whatever fails on the way; so does a failed
:meth:`Sandbox.start`. Containers and processes are in :mod:`cocoon.api.pod_container`;
docs/api.md is the reference.
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from cocoon.api.ids import validate_id
from cocoon.api.pod_container import Container, Process, agent_errors
from cocoon.api.pod_share import PodShare
from cocoon.config import Config
from cocoon.errors import AlreadyExists, CocoonError, InvalidArgument, NotFound, StateError
from cocoon.log import bind, get_logger
from cocoon.oci.model import Spec
from cocoon.protocol.types import ContainerStats, NetInterface

if TYPE_CHECKING:
    from cocoon.api.guest import BootTimes, GuestVM
    from cocoon.api.pod_hotplug import PodInterfaces
    from cocoon.hypervisors.base import Hypervisor
    from cocoon.protocol.agent_client import AgentClient

__all__ = ["Container", "ContainerStats", "Process", "Sandbox", "SandboxState", "clean_up", "pod_vm_size"]

log = get_logger("api")

#: Bytes a unix socket path may have (sun_path is 108 bytes with the terminating NUL).
MAX_SOCKET_PATH = 107
_LONGEST_SOCKET = "agent.sock"  # qmp.sock, agent.sock, vfs.sock live in state_dir
#: Seconds :meth:`Sandbox.stop` waits for pending waits/reads to settle once the VM is gone.
SETTLE_TIMEOUT = 2.0


class SandboxState(enum.StrEnum):
    """A sandbox's life cycle::

        new --start()--> starting --> running --stop()--> stopping --> stopped
                             |                                            ^
                             +------------- start failed -----------------+
        new --stop()--> stopped

    A stopped sandbox holds nothing (no process, mount or socket) and cannot start again.
    """

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"

    def transition(self, to: SandboxState, *, sandbox: str | None = None) -> SandboxState:
        """Return ``to`` if the life cycle allows going there from here, else raise StateError."""
        if to not in _NEXT[self]:
            sources = sorted(s.value for s in SandboxState if to in _NEXT[s])
            raise StateError(f"sandbox cannot go from {self} to {to}", sandbox=sandbox, state=str(self),
                             required=" or ".join(sources) or "none")  # fmt: skip
        return to

    def require_running(self, action: str, *, sandbox: str | None = None, **context: str | None) -> None:
        """Raise StateError unless the sandbox runs: containers live only in a running sandbox."""
        if self is not SandboxState.RUNNING:
            raise StateError(f"cannot {action}: the sandbox is {self}", sandbox=sandbox, state=str(self),
                             required="running", **context)  # fmt: skip


_NEXT: dict[SandboxState, frozenset[SandboxState]] = {
    SandboxState.NEW: frozenset({SandboxState.STARTING, SandboxState.STOPPED}),
    SandboxState.STARTING: frozenset({SandboxState.RUNNING, SandboxState.STOPPED}),
    SandboxState.RUNNING: frozenset({SandboxState.STOPPING}),
    SandboxState.STOPPING: frozenset({SandboxState.STOPPED}),
    SandboxState.STOPPED: frozenset(),
}


def pod_vm_size(
    cfg: Config, *, memory_limit_bytes: int = 0, cpu_quota: int = 0, cpu_period: int = 0
) -> tuple[int, int]:
    """Guest memory (MiB) and vCPUs for a pod whose limits are given: the configured base plus the
    memory limit, and at least as many vCPUs as the CPU quota asks for (capped at the host's).

    The VM is sized once, at start: pass the result as ``memory_mib``/``vcpus`` of :class:`Sandbox`.
    Zero or negative limits mean "none" (the configured size).
    """
    q = cfg.hypervisor.qemu
    memory, vcpus = q.memory_mib, q.vcpus
    if memory_limit_bytes > 0:
        memory += -(-memory_limit_bytes // (1 << 20))
    if cpu_quota > 0 and cpu_period > 0:
        vcpus = max(vcpus, min(os.cpu_count() or 1, -(-cpu_quota // cpu_period)))
    return memory, vcpus


def clean_up(state_dir: Path) -> bool:
    """Undo what a sandbox whose owner died (SIGKILL) left in ``state_dir``.

    Its QEMU and virtiofsd died with it (they get SIGKILL when their owner dies); its bind mounts
    did not: they are unmounted here, then the share directory and the sockets are removed (logs
    stay). Idempotent; False if something could not be removed (it is logged). Call it before
    reusing a ``state_dir``, e.g. when a shim restarts.
    """
    state_dir = Path(os.path.abspath(state_dir))
    ok = PodShare.clean_stale(state_dir / "shared")
    for name in ("qmp.sock", "agent.sock", "vfs.sock"):
        try:
            (state_dir / name).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove a stale socket", path=str(state_dir / name), error=exc.strerror)
            ok = False
    return ok


class Sandbox:
    """One VM for a pod, and the containers in it.

    ``state_dir`` is the sandbox's own directory (created if missing, mode 0700): sockets
    (``qmp.sock``, ``agent.sock``, ``vfs.sock``), logs (``console.log``, ``qemu.log``,
    ``vfs.sock.log``) and the share (``shared/``) live there. Stop removes the sockets and the share
    and leaves the logs; the caller removes the directory. Its path must be short enough for unix
    sockets (about 95 bytes).

    ``memory_mib``/``vcpus`` size the VM (0: the configured ``[hypervisor.qemu]`` values). The pod's
    limits, not each container's, should size it: see :func:`pod_vm_size`. Container limits are
    applied to their cgroups inside the guest. ``hostname`` (default: the sandbox id) and ``dns``
    (``resolv.conf`` lines or bare server addresses) are the guest's. ``netns``: the pod's network
    namespace (path), whose interfaces are wired to the VM (docs/networking.md). ``share_dir``: where
    the share lives instead of ``<state_dir>/shared`` (a path that must not exist yet).
    """

    def __init__(
        self,
        cfg: Config,
        sandbox_id: str,
        state_dir: Path,
        *,
        memory_mib: int = 0,
        vcpus: int = 0,
        hostname: str = "",
        dns: Sequence[str] = (),
        netns: str = "",
        share_dir: Path | None = None,
    ) -> None:
        self.id = validate_id(sandbox_id, "sandbox id")
        self.cfg = cfg
        self.state_dir = Path(os.path.abspath(state_dir))
        if len(os.fsencode(self.state_dir / _LONGEST_SOCKET)) > MAX_SOCKET_PATH:
            room = MAX_SOCKET_PATH - len(_LONGEST_SOCKET) - 1
            raise InvalidArgument("state_dir is too long for unix sockets", sandbox=sandbox_id,
                                  path=str(self.state_dir), max_bytes=room)  # fmt: skip
        if memory_mib < 0 or vcpus < 0:
            raise InvalidArgument("memory_mib and vcpus must not be negative", sandbox=sandbox_id,
                                  memory_mib=memory_mib, vcpus=vcpus)  # fmt: skip
        self.memory_mib = memory_mib or cfg.hypervisor.qemu.memory_mib
        self.vcpus = vcpus or cfg.hypervisor.qemu.vcpus
        self.hostname = hostname or sandbox_id[:63]
        self.dns = tuple(dns)
        self.netns = netns  # the pod's network namespace (path): wired to the VM (docs/networking.md)
        self._state = SandboxState.NEW
        self._lock = asyncio.Lock()
        self._stack = AsyncExitStack()
        self._share = PodShare(Path(os.path.abspath(share_dir)) if share_dir else self.state_dir / "shared")
        self._guest: GuestVM | None = None
        self._agent: AgentClient | None = None
        self._containers: dict[str, Container] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._interfaces: PodInterfaces | None = None  # hot-plug of the netns's interfaces

    # -- read-only facts ---------------------------------------------------------------------------
    @property
    def state(self) -> SandboxState:
        """new, starting, running, stopping or stopped."""
        return self._state

    @property
    def containers(self) -> Mapping[str, Container]:
        """The containers not yet removed, by id (a copy)."""
        return dict(self._containers)

    @property
    def share_dir(self) -> Path:
        """The host directory exported to the guest (``/run/cocoon/shared`` there)."""
        return self._share.root

    @property
    def agent(self) -> AgentClient | None:
        """The guest agent's client while the sandbox runs, else None.

        Low level: for a caller that speaks the agent API itself (the CLI's monitor relays it to
        later commands). Containers made through it behind the sandbox's back are not tracked.
        """
        return self._agent_or_none()

    @property
    def boot_times(self) -> BootTimes | None:
        """Seconds from launching the VMM to the agent channel and to the agent's first answer."""
        return self._guest.times if self._guest is not None else None

    @property
    def accel(self) -> str:
        """The accelerator the VM runs with (``kvm`` or ``tcg``), once started."""
        return self._guest.accel if self._guest is not None else ""

    def container(self, container_id: str) -> Container:
        """The container named ``container_id``; NotFound if there is none (or it was removed)."""
        found = self._containers.get(container_id)
        if found is None:
            raise NotFound("no such container in the sandbox", sandbox=self.id, container=container_id)
        return found

    # -- life cycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Share directory, virtiofsd, VM, agent, CreateSandbox (the guest mounts the share).

        On failure everything already set up is undone, the sandbox is ``stopped`` and the error
        (with ``sandbox`` in its context; BootError carries the guest console's tail) is raised.
        """
        async with self._lock:
            self._state = self._state.transition(SandboxState.STARTING, sandbox=self.id)
            with bind(sandbox=self.id):
                started = time.monotonic()
                try:
                    await self._start()
                except BaseException as exc:
                    try:
                        await _close_fully(self._stack)
                    finally:
                        self._guest = self._agent = None
                        self._state = SandboxState.STOPPED
                    if isinstance(exc, CocoonError):
                        exc.add_context(sandbox=self.id)
                    raise
                self._state = SandboxState.RUNNING
                log.info("sandbox ready", seconds=round(time.monotonic() - started, 3), memory_mib=self.memory_mib,
                         vcpus=self.vcpus)  # fmt: skip

    async def _start(self) -> None:
        from cocoon.api import pod_network
        from cocoon.api.guest import GuestVM
        from cocoon.api.pod_hotplug import PodInterfaces
        from cocoon.storage import shared
        from cocoon.storage.virtiofs import VirtioFsDaemon

        if self.cfg.runtime.shared_fs != "virtio-fs":
            raise InvalidArgument("pod sandboxes need runtime.shared_fs = virtio-fs", value=self.cfg.runtime.shared_fs)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._share.root.exists():
            # Another sandbox's (live: never touch it) or a dead owner's (clean_up() undoes it).
            raise AlreadyExists("state_dir already holds a share: in use, or call clean_up() after its owner died",
                                path=str(self._share.root))  # fmt: skip
        stack = self._stack
        # Registered first, closed last: the mounts go once virtiofsd and the VM are gone.
        stack.callback(self._share.close)
        self._share.open()  # shared propagation *before* virtiofsd makes its namespace
        daemon = VirtioFsDaemon(self._share.root, self.state_dir / "vfs.sock", binary=self.cfg.runtime.virtiofsd,
                                tag=shared.SHARE_TAG)  # fmt: skip
        share = stack.enter_context(daemon)
        net = await pod_network.attach(stack, self.cfg, self.netns, sandbox=self.id) if self.netns else None
        if self.netns:  # registered before the VM: what is still hot-plugged is unwired once it is gone
            self._interfaces = PodInterfaces(self.cfg, self.netns, sandbox=self.id, boot=net)
            stack.push_async_callback(self._interfaces.close)
        guest = GuestVM(self.cfg, self.id, self.state_dir, memory_mib=self.memory_mib, vcpus=self.vcpus,
                        shared_dirs=(share,), nics=net.nics if net else ())  # fmt: skip
        await stack.enter_async_context(guest)
        self._guest, self._agent = guest, guest.agent
        assert self._agent is not None
        with agent_errors("create sandbox in the guest", sandbox=self.id):
            await self._agent.create_sandbox(
                sandbox_id=self.id, hostname=self.hostname, dns=self.dns,
                storages=[{"driver": "virtio-fs", "source": shared.SHARE_TAG, "fstype": "virtiofs",
                           "mount_point": shared.GUEST_SHARED}],
            )  # fmt: skip
        if net is not None:
            with agent_errors("configure the guest's network", sandbox=self.id):
                await pod_network.configure_guest(self._agent, net, sandbox=self.id)

    async def stop(self) -> None:
        """Remove every container, power the guest off, stop virtiofsd, undo every mount. Idempotent.

        Containers go with the guest's DestroySandbox (one call kills and deletes them all); the VM
        is stopped even if the guest does not answer (QMP ``quit``, then SIGKILL). Pending
        :meth:`Process.wait` calls get the status (or an AgentError if the guest died first).
        """
        async with self._lock:
            if self._state is SandboxState.STOPPED:
                return
            if self._state is SandboxState.NEW:
                self._state = self._state.transition(SandboxState.STOPPED)
                return
            self._state = self._state.transition(SandboxState.STOPPING, sandbox=self.id)
            with bind(sandbox=self.id):
                started = time.monotonic()
                for c in self._containers.values():
                    c._forget()
                self._containers.clear()
                try:
                    await _close_fully(self._stack)
                finally:
                    self._agent = None
                    self._state = SandboxState.STOPPED
                    await self._settle()
                log.info("sandbox stopped", seconds=round(time.monotonic() - started, 3))

    async def _settle(self) -> None:
        """Let background waits end (the agent connection is closed: they fail at once)."""
        pending = {t for t in self._tasks if not t.done()}
        if pending:
            _, still = await asyncio.wait(pending, timeout=SETTLE_TIMEOUT)
            for task in still:
                task.cancel()
        self._tasks.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- containers --------------------------------------------------------------------------------
    async def create_container(self, container_id: str, spec: Spec) -> Container:
        """Create a container from ``spec`` (see :func:`cocoon.oci.spec.load`) in the running sandbox.

        Its rootfs and bind-mount sources are bind-mounted into the share (visible to the guest at
        once), then the guest runs ``crun create``: the container is ``created`` and its init waits
        for :meth:`Container.start`. Host hooks of the spec are not run here (the caller's job).
        Errors: InvalidArgument (bad id, no ``process``), AlreadyExists (id in use), NotFound
        (rootfs or a bind source missing), StateError (sandbox not running), AgentError (crun's
        message); nothing of the container is left behind.
        """
        validate_id(container_id, "container id")
        async with self._lock:
            agent = self._agent_for("create container", container=container_id)
            if container_id in self._containers:
                raise AlreadyExists("container id in use", sandbox=self.id, container=container_id)
            if spec.process is None:
                raise InvalidArgument("process: required", field="process", file=str(spec.path), sandbox=self.id,
                                      container=container_id)  # fmt: skip
            with bind(sandbox=self.id, container=container_id):
                try:
                    plan = self._share.add(spec, container_id)
                except CocoonError as exc:
                    exc.add_context(sandbox=self.id, container=container_id)
                    raise
                try:
                    with agent_errors("create container", sandbox=self.id, container=container_id):
                        await agent.create_container(container_id, plan.guest_spec)
                except BaseException as exc:
                    try:
                        # An answer (crun's error...) means the guest cleaned up; a timeout or a
                        # cancellation may leave the container there after all.
                        if not (isinstance(exc, CocoonError) and exc.context.get("code")):
                            await self._forget_in_guest(agent, container_id)
                    finally:
                        self._share.remove(container_id)
                    raise
                container = Container(self, container_id, spec)
                self._containers[container_id] = container
                log.info("container created", binds=len(plan.binds))
                return container

    async def _forget_in_guest(self, agent: AgentClient, container_id: str) -> None:
        try:
            await agent.remove_container(container_id, wait=5, timeout=15.0)
        except CocoonError as exc:
            log.debug("no container to remove in the guest", container=container_id, error=str(exc))

    # -- network -----------------------------------------------------------------------------------
    async def add_interface(self, name: str) -> NetInterface:
        """Give the running guest the interface ``name`` that a CNI plugin just added to the pod's
        network namespace (hot-plug); the guest's view of it (name, MAC, MTU, addresses).

        It is wired like the start's interfaces (``runtime.internetworking_model``), gets a
        virtio-net NIC with its MAC and MTU, and the agent configures its addresses, the routes
        (the guest's table is re-synced with the namespace's for every wired interface) and its
        static neighbours. Needs ``[hypervisor.qemu] hotplug_slots`` > 0 when the sandbox started.
        Errors: InvalidArgument (no netns, no hot-plug slots), NotFound (no such interface in
        the namespace), AlreadyExists (wired already), NetworkError, HypervisorError (no free
        slot, QEMU refused), AgentError; nothing of the interface is left behind.
        """
        async with self._lock:
            interfaces, vm = self._hotplug_for("add a network interface", name)
            with bind(sandbox=self.id), agent_errors("configure the hot-plugged interface", sandbox=self.id):
                return await interfaces.add(vm, self._agent_for("add a network interface"), name)

    async def remove_interface(self, name: str) -> None:
        """Take back an interface given by :meth:`add_interface` (before or after the CNI plugin
        deleted it from the namespace): the guest releases the NIC (~5 s: Linux's PCIe hot-plug
        waits that long), then the tap and the filters go. Interfaces wired at start cannot be
        removed (InvalidArgument); NotFound for a name never added. HypervisorError if the guest
        does not release the NIC in time (the host side is undone all the same).
        """
        async with self._lock:
            interfaces, vm = self._hotplug_for("remove a network interface", name)
            with bind(sandbox=self.id):
                await interfaces.remove(vm, name)

    @property
    def interfaces(self) -> tuple[str, ...]:
        """Names of the pod interfaces wired to the VM: the start's, then the hot-plugged ones."""
        return self._interfaces.names if self._interfaces is not None else ()

    def _hotplug_for(self, action: str, name: str) -> tuple[PodInterfaces, Hypervisor]:
        self._state.require_running(action, sandbox=self.id, interface=name)
        if self._interfaces is None:
            raise InvalidArgument(f"cannot {action}: the sandbox has no network namespace", sandbox=self.id,
                                  interface=name)  # fmt: skip
        assert self._guest is not None and self._guest.vm is not None
        return self._interfaces, self._guest.vm

    async def next_oom(self) -> str:
        """Wait until a container of the sandbox hits its memory limit in the guest; its id.

        Meant for one consumer (the agent hands each event out once). StateError once the sandbox
        is not running; AgentError if the guest goes away meanwhile.
        """
        agent = self._agent_for("wait for OOM events")
        with agent_errors("wait for OOM events", sandbox=self.id):
            return await agent.get_oom_event()

    # -- internals used by Container and Process ---------------------------------------------------
    def _agent_for(self, action: str, **context: str | None) -> AgentClient:
        self._state.require_running(action, sandbox=self.id, **context)
        assert self._agent is not None
        return self._agent

    def _agent_or_none(self) -> AgentClient | None:
        return self._agent if self._state is SandboxState.RUNNING else None

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _container_removed(self, container: Container) -> None:
        if self._containers.get(container.id) is container:
            del self._containers[container.id]
        self._share.remove(container.id)

    def __repr__(self) -> str:
        return f"<Sandbox {self.id}: {self._state}, {len(self._containers)} containers>"


async def _close_fully(stack: AsyncExitStack) -> None:
    """Unwind ``stack`` to the end even if the caller is cancelled meanwhile (then re-raise that)."""
    closing = asyncio.ensure_future(stack.aclose())
    try:
        await asyncio.shield(closing)
    except asyncio.CancelledError:
        await closing  # a half-undone sandbox would leak a VM or mounts: finish first
        raise
