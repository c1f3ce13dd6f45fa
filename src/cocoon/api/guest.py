"""A booted guest: the VM plus a connected, answering agent. Every sandbox stands on one.

``GuestVM`` resolves the image and the accelerator, starts the hypervisor driver,
connects the agent client and waits for its first answer; leaving the ``async with``
block powers the guest off through the agent, then stops the VMM (killing it after
the configured deadline) and removes its sockets. A failure anywhere in between
unwinds whatever was already set up (an ``AsyncExitStack``), so nothing is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cocoon.config import Config
from cocoon.errors import AgentError, BootError, CocoonError
from cocoon.hypervisors.base import Hypervisor, NetDevice, SharedDir, VMSpec
from cocoon.log import bind, get_logger

log = get_logger("api")


@dataclass(frozen=True)
class BootTimes:
    """Seconds from launching the VMM to each milestone."""

    channel_open: float
    agent_ready: float


def _channel_kind(cfg: Config) -> str:
    if cfg.agent.channel != "auto":
        return cfg.agent.channel
    return "vsock" if Path("/dev/vhost-vsock").exists() else "virtio-serial"


class GuestVM:
    """One VM with our guest image and a live agent connection."""

    def __init__(
        self,
        cfg: Config,
        sandbox_id: str,
        workdir: Path,
        *,
        memory_mib: int = 0,
        vcpus: int = 0,
        shared_dirs: tuple[SharedDir, ...] = (),
        nics: tuple[NetDevice, ...] = (),
    ) -> None:
        self.cfg = cfg
        self.sandbox_id = sandbox_id
        self.workdir = workdir
        self.memory_mib = memory_mib or cfg.hypervisor.qemu.memory_mib
        self.vcpus = vcpus or cfg.hypervisor.qemu.vcpus
        self.shared_dirs = shared_dirs
        self.nics = nics
        self.vm: Hypervisor | None = None
        self.agent: Any = None  # cocoon.protocol.agent_client.AgentClient
        self.accel = ""
        self.accel_reason = ""
        self.times: BootTimes | None = None
        self.template: Any = None  # cocoon.api.factory.Template this VM was restored from
        self._stack = AsyncExitStack()

    async def vm_spec(self) -> VMSpec:
        """What this guest boots with: image, accelerator (probed once, cached) and size resolved."""
        from cocoon.hypervisors.accel import choose_accel
        from cocoon.hypervisors.arch import arch_info
        from cocoon.image import find_image

        q = self.cfg.hypervisor.qemu
        image = find_image(self.cfg)
        kernel = Path(q.kernel) if q.kernel else image.kernel_for(q.machine or arch_info().default_machine)
        initrd = Path(q.initrd) if q.initrd else image.initrd
        spec = VMSpec(
            sandbox_id=self.sandbox_id,
            workdir=self.workdir,
            kernel=kernel,
            initrd=initrd,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            shared_dirs=self.shared_dirs,
            nics=self.nics,
            channel="vsock" if _channel_kind(self.cfg) == "vsock" else "virtio-serial",
            vsock_port=self.cfg.agent.vsock_port,
            kernel_params=(*q.kernel_params.split(), *(["cocoon.debug=1"] if self.cfg.agent.debug else [])),
            machine=q.machine,
            binary=q.path,
            tcg_tb_size_mib=q.tcg_tb_size_mib,
            boot_timeout=q.boot_timeout,
            hotplug_slots=q.hotplug_slots,
        )
        choice = await choose_accel(
            q.accel,
            spec,
            cache_file=Path(self.cfg.image.cache_dir).parent / "accel.json",
            probe_timeout=q.kvm_probe_timeout,
        )
        self.accel, self.accel_reason = choice.accel, choice.reason
        if choice.accel == "tcg" and q.accel == "auto":
            log.warning("KVM cannot run the guest here: using TCG (software emulation); see `cocoon check`",
                        sandbox=self.sandbox_id, reason=choice.reason[:160])  # fmt: skip
        from dataclasses import replace

        return replace(spec, accel=choice.accel)

    async def start(self) -> None:
        from cocoon.api import factory
        from cocoon.hypervisors.base import get_driver

        with bind(sandbox=self.sandbox_id):
            try:
                spec = await self.vm_spec()
                boot_spec = await self._from_template(spec) if self.cfg.factory.template else spec
                if boot_spec.incoming is not None:
                    self._stack.callback(factory.remove_quietly, boot_spec.memory_file)  # if the VMM never got it
                vm = get_driver(self.cfg.hypervisor.driver)(boot_spec)
                self.vm = vm
                self._stack.push_async_callback(self._stop_vm)
                started = time.monotonic()
                try:
                    await vm.start()
                except BootError:
                    if self.template is not None:  # a saved state this QEMU cannot load: rebuilt next time
                        log.warning("restoring the template failed: removing it", template=self.template.directory.name)
                        factory.remove(self.template)
                    raise
                finally:
                    if boot_spec.incoming is not None:  # the VMM maps it (or failed): no name needed
                        factory.remove_quietly(boot_spec.memory_file)
                opened = time.monotonic()
                if boot_spec.incoming is not None:
                    # Plugged first: the guest probes them while the host connects and reseeds.
                    await self._plug_clone_devices(vm, spec)
                self.agent = await connect_agent(self.cfg, vm, started, self.sandbox_id)
                self._stack.push_async_callback(self.agent.close)
                # The guest clock starts from the emulated RTC (seconds off, or a template's stale
                # time after a restore): set it from the host, first.
                await self.agent.set_guest_datetime()
                if boot_spec.incoming is not None:
                    await self._adopt_clone(spec)
                ready = time.monotonic()
                self.times = BootTimes(opened - started, ready - started)
                log.info("guest ready", boot_seconds=round(ready - started, 3), accel=self.accel,
                         restored=boot_spec.incoming is not None)  # fmt: skip
            except BaseException:
                await self._stack.aclose()
                raise

    async def _from_template(self, spec: VMSpec) -> VMSpec:
        """A clone of the template for ``spec``'s shape (built first if needed), or ``spec`` itself
        when it cannot use one."""
        from cocoon.api import factory

        why = factory.unfit(spec)
        if why:
            log.info("booting without a template", reason=why)
            return spec
        try:
            self.template = await factory.ensure_template(self.cfg, spec)
        except CocoonError as exc:  # the sandbox can still boot; the next one tries to build it again
            log.warning("cannot make a template VM: booting without one", error=str(exc).splitlines()[0][:300])
            return spec
        return factory.clone(self.cfg, self.template, spec)

    @staticmethod
    async def _plug_clone_devices(vm: Hypervisor, spec: VMSpec) -> None:
        """A template's clone gets this sandbox's shares and NICs by hot-plug (the template had none)."""
        for share in spec.shared_dirs:
            await vm.hotplug_fs(share)
        for nic in spec.nics:
            await vm.hotplug_nic(nic)

    async def _adopt_clone(self, spec: VMSpec) -> None:
        """Make a template's clone this sandbox's VM: fresh randomness, its NICs visible."""
        import os

        from cocoon.api.pod_hotplug import wait_for_macs

        await self.agent.reseed_random_dev(os.urandom(256))
        if spec.nics:
            await wait_for_macs(self.agent, [nic.mac for nic in spec.nics])

    async def _stop_vm(self) -> None:
        if self.vm is not None:
            await self.vm.stop(timeout=self.cfg.hypervisor.qemu.shutdown_timeout)

    async def stop(self) -> None:
        """Power the guest off through the agent, then make sure the VMM is gone."""
        with bind(sandbox=self.sandbox_id):
            try:
                if self.agent is not None:
                    # Removing each container takes ~1 s under TCG; the VM is stopped regardless.
                    await self.agent.destroy_sandbox(timeout=10.0)
            except AgentError as exc:
                log.debug("agent did not power off the guest", error=str(exc))
            finally:
                await self._stack.aclose()  # whatever happened above, the VM goes

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def connect_agent(cfg: Config, vm: Hypervisor, started: float, sandbox_id: str) -> Any:
    """An agent client of ``vm`` once the agent answers, retrying until the boot deadline
    (counted from ``started``); BootError with the console's tail otherwise."""
    from cocoon.protocol.agent_client import AgentClient
    from cocoon.protocol.ttrpc import Transport, UnixTransport, VsockTransport

    channel = vm.agent_channel
    transport: Transport = (
        VsockTransport(channel.cid, channel.port) if channel.kind == "vsock" else UnixTransport(channel.path)
    )
    deadline = started + cfg.hypervisor.qemu.boot_timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        agent = None
        try:
            agent = await AgentClient.connect(transport, timeout=cfg.agent.call_timeout)
            await agent.check(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
            return agent
        except CocoonError as exc:
            last = exc
            if agent is not None:
                with contextlib.suppress(Exception):
                    await agent.close()
            await asyncio.sleep(0.05)
    raise BootError(
        "guest agent did not answer",
        sandbox=sandbox_id,
        error=str(last) if last else None,
        console_tail=vm.console_tail() or "(empty)",
    )


async def demo_report(cfg: Config) -> dict[str, Any]:
    """Boot one VM, ask its agent about the guest, stop it: the README's first command."""
    import tempfile

    root = Path(cfg.runtime.root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="demo-", dir=root) as tmp:
        async with GuestVM(cfg, "demo", Path(tmp)) as guest:
            details = await guest.agent.guest_details()
            version = await guest.agent.version()
            assert guest.times is not None
            return {
                "guest kernel": details.kernel_release,
                "guest memory": f"{details.memory_total_bytes // (1 << 20)} MiB",
                "guest cpus": details.cpu_count,
                "agent version": version.agent_version,
                "accelerator": f"{guest.accel} ({guest.accel_reason})",
                "boot to agent": f"{guest.times.agent_ready:.2f} s",
            }
