"""The QEMU driver: microvm by default, kernel + initrd booted directly, QMP control.

The guest agent channel is a ``virtserialport`` named ``cocoon.agent`` backed by a
unix-socket chardev (or a vhost-vsock device where the host has one). The host
connects to that socket as soon as QEMU is up, so the port is "host connected"
before the guest opens it; QEMU's ``VSERPORT_CHANGE`` event then says the agent
has opened its end. The console goes to ``console.log`` in the VM's workdir; lines
that are JSON (the agent's structured logs) are re-emitted on the host log with
``subsystem=agent`` and the sandbox id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cocoon.errors import BootError, HypervisorError, InvalidArgument
from cocoon.hypervisors.arch import arch_info, machine_info, tsc_khz
from cocoon.hypervisors.base import AgentChannel, Capabilities, Hypervisor, NetDevice, SharedDir, VMSpec, VMState
from cocoon.log import get_logger
from cocoon.util import proc as procs

log = get_logger("hypervisor")
agent_log = get_logger("agent")

AGENT_PORT_NAME = "cocoon.agent"
AGENT_PORT_ID = "agentport"
_IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
#: Most hot-plug root ports: each takes a device number of the root bus (32, shared with q35's own devices).
MAX_HOTPLUG_SLOTS = 16


def kernel_cmdline(spec: VMSpec) -> str:
    """The guest kernel command line: the architecture's defaults, then ours, then the spec's."""
    info = arch_info()
    params = [f"console={info.console}", *info.kernel_params]
    if info.name == "x86_64" and (machine_info(info, spec.machine).bus == "mmio"):
        khz = tsc_khz()
        if khz:
            params.append(f"tsc_early_khz={khz}")
    if spec.hotplug_slots and machine_info(info, spec.machine).bus == "mmio":
        # microvm's ACPI tables have no MCFG: when Linux negotiates _OSC the PCIe config space is
        # not reachable yet, so it does not ask for native hot-plug control and pciehp stays off.
        params.append("pcie_ports=native")
    params.append(f"cocoon.sandbox={spec.sandbox_id}")
    params.append(f"cocoon.channel={spec.channel}")
    if spec.channel == "vsock":
        params.append(f"cocoon.vsock_port={spec.vsock_port}")
    params.extend(spec.kernel_params)
    return " ".join(params)


def build_argv(spec: VMSpec) -> list[str]:
    """The QEMU command line for ``spec`` (pure: unit-tested without QEMU)."""
    info = arch_info()
    machine = machine_info(info, spec.machine)
    wd = spec.workdir
    dev = "device" if machine.bus == "mmio" else "pci"
    if not 0 <= spec.hotplug_slots <= MAX_HOTPLUG_SLOTS:
        raise InvalidArgument("too many hot-plug slots", field="hypervisor.qemu.hotplug_slots",
                              value=spec.hotplug_slots, max=MAX_HOTPLUG_SLOTS)  # fmt: skip
    machine_opts = machine.qemu_machine
    if spec.hotplug_slots and machine.bus == "mmio":
        machine_opts += ",pcie=on"  # a GPEX PCIe host bridge next to virtio-mmio: root ports hang on it
    argv = [spec.binary or info.qemu_binary, "-name", f"cocoon-{spec.sandbox_id},debug-threads=on"]
    if spec.memory_file is not None:
        # Shared, so that a vhost-user daemon (virtiofsd) can map it too, and x-ignore-shared
        # leaves it out of a saved state.
        argv += ["-object", f"memory-backend-file,id=mem,size={spec.memory_mib}M,mem-path={spec.memory_file},"
                            "share=on"]  # fmt: skip
        machine_opts += ",memory-backend=mem"
    elif spec.shared_memory or spec.shared_dirs:
        argv += ["-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on"]
        machine_opts += ",memory-backend=mem"
    argv += ["-M", machine_opts]
    if spec.accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", info.kvm_cpu]
    else:
        argv += ["-accel", f"tcg,tb-size={spec.tcg_tb_size_mib}", "-cpu", info.tcg_cpu]
    argv += [
        "-m", f"{spec.memory_mib}M",
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", f"socket,id=qmp,path={wd / 'qmp.sock'},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"file,id=console,path={wd / 'console.log'}",
        "-serial", "chardev:console",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", kernel_cmdline(spec),
    ]  # fmt: skip
    if machine.bus == "mmio":
        argv += ["-global", "virtio-mmio.force-legacy=false"]
    if spec.channel == "vsock":
        argv += ["-device", f"vhost-vsock-{dev},id=vsock0,guest-cid={spec.vsock_cid}"]
    else:
        argv += [
            "-device", f"virtio-serial-{dev},id=vser0,max_ports=2",
            "-chardev", f"socket,id=agent,path={wd / 'agent.sock'},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,id={AGENT_PORT_ID},name={AGENT_PORT_NAME}",
        ]  # fmt: skip
    for i, share in enumerate(spec.shared_dirs):
        argv += [
            "-chardev", f"socket,id=vfs{i},path={share.socket}",
            "-device", f"vhost-user-fs-{dev},chardev=vfs{i},tag={share.tag},queue-size=1024",
        ]  # fmt: skip
    for nic in spec.nics:
        # fd passing: QEMU never opens /dev/net/tun (nor needs to be in the pod's namespace).
        argv += [
            "-netdev", f"tap,id={nic.id},fd={nic.fd}",
            "-device", f"virtio-net-{dev},netdev={nic.id},mac={nic.mac},host_mtu={nic.mtu}",
        ]  # fmt: skip
    for i in range(spec.hotplug_slots):
        argv += ["-device", f"pcie-root-port,id={hotplug_port(i)},chassis={i + 1},bus=pcie.0"]
    if spec.incoming is not None:
        argv += ["-incoming", "defer"]  # the state arrives over QMP (an fd), after capabilities are set
    argv += list(spec.extra_args)
    return argv


async def _agent_port_opened(events: Any) -> None:
    """Until a ``VSERPORT_CHANGE`` event says the guest opened the agent's port."""
    async for event in events:
        data = event.get("data", {})
        if data.get("id") == AGENT_PORT_ID and data.get("open"):
            return


def hotplug_port(slot: int) -> str:
    """The QEMU id of hot-plug root port number ``slot``."""
    return f"hotplug{slot}"


def nic_device_id(nic_id: str) -> str:
    """The QEMU id of the virtio-net device of a hot-plugged NIC (its netdev is ``nic_id``)."""
    return f"{nic_id}-nic"


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


class QemuVM(Hypervisor):
    """A VM run by one qemu-system process."""

    name = "qemu"

    def __init__(self, spec: VMSpec) -> None:
        super().__init__(spec)
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: Any = None  # qemu.qmp.QMPClient, imported lazily
        self._console_task: asyncio.Task[None] | None = None
        self._console_offset = 0
        self.started_at = 0.0
        self.ready_at = 0.0
        self._slots: list[str | None] = [None] * spec.hotplug_slots  # hot-plug root port -> NIC id
        self._hotplug_lock = asyncio.Lock()  # one fd in flight on the QMP socket at a time

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(
            pause=True,
            hotplug=True,
            snapshot=True,
            vsock=Path("/dev/vhost-vsock").exists(),
            virtio_fs=Path("/usr/lib/qemu/virtiofsd").exists(),
            block=True,
        )

    # -- paths -------------------------------------------------------------------------------
    @property
    def qmp_path(self) -> Path:
        return self.spec.workdir / "qmp.sock"

    @property
    def console_path(self) -> Path:
        return self.spec.workdir / "console.log"

    @property
    def qemu_log_path(self) -> Path:
        return self.spec.workdir / "qemu.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def agent_channel(self) -> AgentChannel:
        if self.spec.channel == "vsock":
            return AgentChannel("vsock", cid=self.spec.vsock_cid, port=self.spec.vsock_port)
        return AgentChannel("virtio-serial", path=str(self.spec.workdir / "agent.sock"))

    def console_tail(self, lines: int = 30) -> str:
        return _tail(self.console_path, lines)

    def _boot_error(self, message: str, **context: Any) -> BootError:
        qemu_err = _tail(self.qemu_log_path, 5)
        return BootError(
            message,
            sandbox=self.spec.sandbox_id,
            qemu_stderr=qemu_err or None,
            console_tail=self.console_tail() or "(empty)",
            **context,
        )

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._require(VMState.NEW, action="start")
        self.state = VMState.STARTING
        for path in (self.spec.kernel, self.spec.initrd):
            if not Path(path).is_file():
                raise HypervisorError("guest image file not found", path=str(path), sandbox=self.spec.sandbox_id)
        self.spec.workdir.mkdir(parents=True, exist_ok=True)
        argv = build_argv(self.spec)
        self.started_at = time.monotonic()
        with self.qemu_log_path.open("wb") as errlog:
            self._proc = procs.popen(argv, stdout=errlog, stderr=errlog, die_with_parent=True,
                                     pass_fds=[nic.fd for nic in self.spec.nics])  # fmt: skip
        log.info("qemu started", sandbox=self.spec.sandbox_id, qemu_pid=self._proc.pid, accel=self.spec.accel)
        self._console_task = asyncio.create_task(self._follow_console())
        await self._connect_qmp()
        if self.spec.incoming is not None:
            await self._restore(self.spec.incoming)
        elif self.spec.channel == "virtio-serial":
            await self._wait_agent_port()
        self.ready_at = time.monotonic()
        self.state = VMState.RUNNING

    async def _connect_qmp(self) -> None:
        from qemu.qmp import QMPClient  # lazy: only VM owners pay for it

        assert self._proc is not None
        deadline = time.monotonic() + 10.0
        while not self.qmp_path.exists():
            if self._proc.poll() is not None:
                raise self._boot_error("qemu exited during start", exit_code=self._proc.returncode)
            if time.monotonic() > deadline:
                raise self._boot_error("qemu did not open its QMP socket", path=str(self.qmp_path))
            await asyncio.sleep(0.002)
        # qemu.qmp logs every failed attempt at ERROR; the retries below are expected.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
        while True:
            qmp = QMPClient(f"cocoon-{self.spec.sandbox_id}")
            try:
                await qmp.connect(str(self.qmp_path))
                break
            except Exception as exc:
                # The socket file exists from bind() a moment before QEMU listens on it.
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise self._boot_error(f"cannot connect to QMP: {exc}", path=str(self.qmp_path)) from exc
                await asyncio.sleep(0.005)
        self._qmp = qmp

    async def _wait_agent_port(self) -> None:
        assert self._proc is not None and self._qmp is not None
        timeout = self.spec.boot_timeout

        async def port_opened() -> None:
            with self._qmp.listener("VSERPORT_CHANGE") as listener:
                await _agent_port_opened(listener)

        opened = asyncio.create_task(port_opened())
        exited = asyncio.create_task(procs.wait_exit(self._proc))
        try:
            done, _ = await asyncio.wait({opened, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (opened, exited):
                task.cancel()
            await asyncio.gather(opened, exited, return_exceptions=True)
        if opened in done:
            return
        await self._drain_console()
        if exited in done:
            raise self._boot_error("qemu exited before the agent came up", exit_code=self._proc.returncode)
        raise self._boot_error("guest agent did not open its channel in time", timeout=timeout)

    # -- templates -----------------------------------------------------------------------------
    async def _restore(self, state_file: Path) -> None:
        """Load a saved state into this (``-incoming defer``) QEMU, RAM from ``spec.memory_file``."""
        assert self._proc is not None
        try:
            fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._boot_error(f"cannot open the saved state: {exc.strerror}", path=str(state_file)) from exc
        try:
            await self.qmp("migrate-set-capabilities", _IGNORE_SHARED)
            async with self._hotplug_lock:
                await self._pass_fd(fd, "incoming")
                await self.qmp("migrate-incoming", {"uri": "fd:incoming"})
        finally:
            os.close(fd)
        deadline = time.monotonic() + self.spec.boot_timeout
        while True:
            try:
                status = (await self.qmp("query-status"))["status"]
            except HypervisorError:  # QEMU going away: the check below says so
                status = "inmigrate"
            if self._proc.poll() is not None:  # QEMU exits when the state does not fit the machine
                raise self._boot_error("qemu exited while restoring a saved VM", exit_code=self._proc.returncode,
                                       path=str(state_file))  # fmt: skip
            if status != "inmigrate":
                break
            if time.monotonic() > deadline:
                raise self._boot_error("restoring a saved VM timed out", timeout=self.spec.boot_timeout)
            await asyncio.sleep(0.005)
        if status != "running":
            await self.qmp("cont")
        log.info("vm restored", sandbox=self.spec.sandbox_id, seconds=round(time.monotonic() - self.started_at, 3))

    async def save(self, state_file: Path) -> None:
        self._require(VMState.RUNNING, VMState.PAUSED, action="save")
        if self.spec.memory_file is None:
            raise HypervisorError("only a VM whose RAM is in a file can be saved", sandbox=self.spec.sandbox_id)
        if self.state == VMState.RUNNING:
            await self.qmp("stop")
            self.state = VMState.PAUSED
        await self.qmp("migrate-set-capabilities", _IGNORE_SHARED)
        fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            async with self._hotplug_lock:
                await self._pass_fd(fd, "outgoing")
                await self.qmp("migrate", {"uri": "fd:outgoing"})
        finally:
            os.close(fd)
        deadline = time.monotonic() + 60.0
        while (info := await self.qmp("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise HypervisorError("saving the VM timed out", sandbox=self.spec.sandbox_id, path=str(state_file))
            await asyncio.sleep(0.01)
        if info.get("status") != "completed":
            raise HypervisorError("saving the VM failed", sandbox=self.spec.sandbox_id, path=str(state_file),
                                  error=info.get("error-desc", info.get("status")))  # fmt: skip
        log.info("vm saved", sandbox=self.spec.sandbox_id, path=str(state_file), bytes=os.path.getsize(state_file))

    async def agent_handover(self, close: Callable[[], Awaitable[None]]) -> None:
        if self.spec.channel != "virtio-serial" or self._qmp is None:
            await close()
            return
        # The guest reopens its port once it saw the host go (chardev.py): wait for that open.
        with self._qmp.listener("VSERPORT_CHANGE") as events:
            await close()
            try:
                await asyncio.wait_for(_agent_port_opened(events), 10.0)
            except TimeoutError:
                raise HypervisorError("the guest agent did not reopen its port", sandbox=self.spec.sandbox_id) from None

    async def stop(self, *, timeout: float = 5.0) -> int | None:
        proc = self._proc
        if self.state == VMState.STOPPED or proc is None:
            self.state = VMState.STOPPED
            self._cleanup_sockets()
            return None
        status: int | None = None
        if timeout > 0:
            status = await procs.wait_exit(proc, timeout)
        if status is None and self._qmp is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp.execute("quit"), 1.0)
            status = await procs.wait_exit(proc, 1.0)
        if status is None:
            status = procs.terminate(proc, grace=0.5)
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
            self._qmp = None
        if self._console_task is not None:
            self._console_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._console_task
            self._console_task = None
        await self._drain_console()
        self.state = VMState.STOPPED
        self._cleanup_sockets()
        log.info("qemu stopped", sandbox=self.spec.sandbox_id, exit_code=status)
        return status

    def _cleanup_sockets(self) -> None:
        for name in ("qmp.sock", "agent.sock"):
            with contextlib.suppress(FileNotFoundError):
                (self.spec.workdir / name).unlink()

    async def pause(self) -> None:
        self._require(VMState.RUNNING, action="pause")
        await self.qmp("stop")
        self.state = VMState.PAUSED

    async def resume(self) -> None:
        self._require(VMState.PAUSED, action="resume")
        await self.qmp("cont")
        self.state = VMState.RUNNING

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command; errors become HypervisorError naming the command."""
        if self._qmp is None:
            raise HypervisorError("QMP is not connected", sandbox=self.spec.sandbox_id, command=command)
        try:
            return await self._qmp.execute(command, arguments)
        except Exception as exc:
            raise HypervisorError(f"qmp {command}: {exc}", sandbox=self.spec.sandbox_id) from exc

    # -- hot-plug ------------------------------------------------------------------------------
    async def hotplug_nic(self, nic: NetDevice) -> None:
        """``getfd`` (the tap fd over SCM_RIGHTS), ``netdev_add tap``, ``device_add virtio-net-pci``
        on a free root port; whatever was added is taken back if a later step fails."""
        self._require(VMState.RUNNING, action="hot-plug a NIC")
        ctx: dict[str, Any] = {"sandbox": self.spec.sandbox_id, "nic": nic.id}
        if nic.id in self._slots:
            raise HypervisorError("a NIC with this id is plugged already", **ctx)
        async with self._hotplug_lock:
            slot = self._free_slot(nic.id)
            await self._pass_fd(nic.fd, nic.id)
            try:
                await self.qmp("netdev_add", {"type": "tap", "id": nic.id, "fd": nic.id})
            except HypervisorError as exc:
                with contextlib.suppress(HypervisorError):  # consumed by a netdev_add that got that far
                    await self.qmp("closefd", {"fdname": nic.id})
                exc.add_context(**ctx)
                raise
            try:
                await self.qmp("device_add", {"driver": "virtio-net-pci", "id": nic_device_id(nic.id),
                                              "netdev": nic.id, "bus": hotplug_port(slot), "mac": nic.mac,
                                              "host_mtu": nic.mtu})  # fmt: skip
            except BaseException as exc:
                with contextlib.suppress(HypervisorError):
                    await self.qmp("netdev_del", {"id": nic.id})
                if isinstance(exc, HypervisorError):
                    exc.add_context(port=hotplug_port(slot), **ctx)
                raise
            self._slots[slot] = nic.id
        log.info("nic hot-plugged", port=hotplug_port(slot), mac=nic.mac, **ctx)

    async def hotplug_fs(self, share: SharedDir) -> None:
        """``chardev-add`` (a client of the share's vhost-user socket), ``device_add
        vhost-user-fs-pci`` on a free root port; the chardev goes again if the device fails."""
        self._require(VMState.RUNNING, action="hot-plug a share")
        device = f"fs-{share.tag}"
        chardev = f"{device}-chr"
        ctx: dict[str, Any] = {"sandbox": self.spec.sandbox_id, "tag": share.tag}
        async with self._hotplug_lock:
            slot = self._free_slot(device)
            await self.qmp("chardev-add", {"id": chardev, "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": str(share.socket)}}, "server": False}}})  # fmt: skip
            try:
                await self.qmp("device_add", {"driver": "vhost-user-fs-pci", "id": device, "chardev": chardev,
                                              "tag": share.tag, "bus": hotplug_port(slot), "queue-size": 1024})
            except BaseException as exc:
                with contextlib.suppress(HypervisorError):
                    await self.qmp("chardev-remove", {"id": chardev})
                if isinstance(exc, HypervisorError):
                    exc.add_context(port=hotplug_port(slot), **ctx)
                raise
            self._slots[slot] = device
        log.info("share hot-plugged", port=hotplug_port(slot), **ctx)

    def _free_slot(self, nic_id: str) -> int:
        for slot, used in enumerate(self._slots):
            if used is None:
                return slot
        raise HypervisorError("no free hot-plug slot", sandbox=self.spec.sandbox_id, nic=nic_id,
                              slots=len(self._slots),
                              hint="start the VM with more [hypervisor.qemu] hotplug_slots")  # fmt: skip

    async def _pass_fd(self, fd: int, name: str) -> None:
        """Hand ``fd`` to QEMU as ``name``: the fd rides on one byte over the QMP socket, ``getfd``
        names the last one received (hence the lock held by the caller)."""
        if self._qmp is None:
            raise HypervisorError("QMP is not connected", sandbox=self.spec.sandbox_id, command="getfd")
        try:
            self._qmp.send_fd_scm(fd)
        except Exception as exc:
            raise HypervisorError(f"pass the tap fd to qemu: {exc}", sandbox=self.spec.sandbox_id, nic=name) from exc
        await self.qmp("getfd", {"fdname": name})

    async def unplug_nic(self, nic_id: str, *, timeout: float = 20.0) -> None:
        """``device_del``, wait for ``DEVICE_DELETED`` (the guest's pciehp powers the slot off:
        ~5 s, Linux's attention-button delay), then ``netdev_del``."""
        self._require(VMState.RUNNING, action="unplug a NIC")  # a paused guest cannot let go
        ctx: dict[str, Any] = {"sandbox": self.spec.sandbox_id, "nic": nic_id}
        if nic_id not in self._slots:
            raise HypervisorError("no hot-plugged NIC with this id", **ctx)
        slot = self._slots.index(nic_id)
        device = nic_device_id(nic_id)
        started = time.monotonic()
        assert self._qmp is not None
        try:
            with self._qmp.listener("DEVICE_DELETED") as events:
                await self.qmp("device_del", {"id": device})

                async def deleted() -> None:
                    async for event in events:
                        if event.get("data", {}).get("device") == device:
                            return

                try:
                    await asyncio.wait_for(deleted(), timeout)
                except TimeoutError:
                    raise HypervisorError("the guest did not release the NIC", timeout=timeout, port=hotplug_port(slot),
                                          hint="the guest kernel needs pciehp (CONFIG_HOTPLUG_PCI_PCIE)",
                                          **ctx) from None  # fmt: skip
            self._slots[slot] = None
        finally:
            # Even a NIC the guest holds on to loses its backend: the tap goes once its owner closes it.
            with contextlib.suppress(HypervisorError):
                await self.qmp("netdev_del", {"id": nic_id})
        log.info("nic unplugged", seconds=round(time.monotonic() - started, 3), **ctx)

    def exited(self) -> bool:
        """True once the QEMU process is gone (guest powered off, crashed or was killed)."""
        return self._proc is None or self._proc.poll() is not None

    # -- console -------------------------------------------------------------------------------
    async def _follow_console(self) -> None:
        while True:
            await self._drain_console()
            await asyncio.sleep(0.1)

    async def _drain_console(self) -> None:
        try:
            with self.console_path.open("rb") as f:
                f.seek(self._console_offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self._console_offset += end + 1
        for raw in data[: end + 1].splitlines():
            forward_console_line(raw.decode(errors="replace").rstrip("\r"), self.spec.sandbox_id)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def forward_console_line(line: str, sandbox_id: str) -> None:
    """Re-emit one guest console line on the host log: agent JSON as subsystem=agent."""
    if not line.strip():
        return
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and "msg" in record:
            level = _LEVELS.get(str(record.pop("level", "info")), logging.INFO)
            msg = str(record.pop("msg"))
            fields = {f"guest_{k}" if k in ("time", "pid") else k: v for k, v in record.items() if k != "subsystem"}
            # The host knows whose console this is: a template's clone still says "template".
            fields["sandbox"] = sandbox_id
            agent_log.log(level, msg, **fields)
            return
    log.debug("guest console", sandbox=sandbox_id, line=line)
