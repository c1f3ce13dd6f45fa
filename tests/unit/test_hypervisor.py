from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cocoon.errors import HypervisorError, NotFound, StateError
from cocoon.hypervisors import arch
from cocoon.hypervisors.accel import KvmInfo, choose_accel, kvm_info
from cocoon.hypervisors.base import Hypervisor, VMSpec, VMState, get_driver
from cocoon.hypervisors.qemu import QemuVM, build_argv, forward_console_line, kernel_cmdline
from cocoon.util import proc


def _spec(tmp_path: Path, **kw) -> VMSpec:
    base = dict(sandbox_id="sb1", workdir=tmp_path, kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd")
    base.update(kw)
    return VMSpec(**base)


def test_registry_finds_qemu_lazily():
    assert get_driver("qemu") is QemuVM
    with pytest.raises(NotFound, match="unknown hypervisor driver"):
        get_driver("firecracker")


def test_arch_table_x86_and_not_yet_rows():
    info = arch.arch_info("x86_64")
    assert info.qemu_binary == "qemu-system-x86_64"
    assert arch.machine_info(info).bus == "mmio"
    assert arch.machine_info(info, "q35").bus == "pci"
    with pytest.raises(HypervisorError, match="not supported yet"):
        arch.arch_info("aarch64")
    with pytest.raises(HypervisorError, match="not known"):
        arch.arch_info("vax")
    with pytest.raises(HypervisorError, match="machine type"):
        arch.machine_info(info, "isapc")


def test_argv_microvm_tcg_virtio_serial(tmp_path):
    argv = build_argv(_spec(tmp_path, memory_mib=128, vcpus=2))
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert "-M microvm," in joined
    assert "-accel tcg,tb-size=32 -cpu max" in joined
    assert "-m 128M" in joined and "-smp 2" in joined
    assert f"socket,id=agent,path={tmp_path}/agent.sock,server=on,wait=off" in joined
    assert "virtserialport,chardev=agent,id=agentport,name=cocoon.agent" in joined
    assert "virtio-serial-device" in joined
    assert "-no-reboot" in argv
    assert "virtio-mmio.force-legacy=false" in joined
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "vmlinux")


def test_argv_kvm_vsock_shared_memory_q35(tmp_path):
    argv = build_argv(_spec(tmp_path, accel="kvm", channel="vsock", vsock_cid=7, machine="q35", shared_memory=True))
    joined = " ".join(argv)
    assert "-accel kvm -cpu host" in joined
    assert "vhost-vsock-pci,id=vsock0,guest-cid=7" in joined
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in joined
    assert "-M q35,memory-backend=mem" in joined
    assert "virtserialport" not in joined


def test_argv_virtio_fs_share_implies_shared_memory(tmp_path):
    from cocoon.hypervisors.base import SharedDir

    argv = " ".join(build_argv(_spec(tmp_path, shared_dirs=(SharedDir("cocoon", tmp_path / "vfs.sock"),))))
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in argv
    assert f"socket,id=vfs0,path={tmp_path}/vfs.sock" in argv
    assert "vhost-user-fs-device,chardev=vfs0,tag=cocoon" in argv


def test_kernel_cmdline_carries_sandbox_and_extra_params(tmp_path):
    line = kernel_cmdline(_spec(tmp_path, kernel_params=("rdinit=/sbin/bare-init",)))
    assert line.startswith("console=ttyS0 ")
    assert "cocoon.sandbox=sb1" in line
    assert line.endswith("rdinit=/sbin/bare-init")
    assert "panic=-1" in line


async def test_start_refuses_missing_image_and_wrong_state(tmp_path, no_leaks):
    vm = QemuVM(_spec(tmp_path))
    with pytest.raises(HypervisorError, match="guest image file not found"):
        await vm.start()
    with pytest.raises(StateError):
        await vm.pause()
    assert await vm.stop() is None
    assert vm.state == VMState.STOPPED


async def test_qemu_that_exits_at_once_gives_boot_error_with_context(tmp_path, no_leaks):
    for name in ("vmlinux", "initrd"):
        (tmp_path / name).write_bytes(b"x")
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\necho 'qemu: could not load kernel' >&2\nexit 1\n")
    fake.chmod(0o755)
    vm = QemuVM(_spec(tmp_path, binary=str(fake)))
    with pytest.raises(HypervisorError) as info:
        async with vm:
            pass
    assert "qemu exited during start" in str(info.value)
    assert info.value.exit_code == 1
    assert "could not load kernel" in str(info.value)
    assert not (tmp_path / "qmp.sock").exists()


def test_kvm_info_reports_absent_device(tmp_path):
    info = kvm_info(dev=str(tmp_path / "kvm"), sys_module=str(tmp_path))
    assert not info.present and not info.usable
    (tmp_path / "kvm_pvm").mkdir()
    (tmp_path / "kvm").write_text("")
    info = kvm_info(dev=str(tmp_path / "kvm"), sys_module=str(tmp_path))
    assert info.flavor == "kvm_pvm"
    assert info.present and not info.usable


async def test_choose_accel_without_probe(tmp_path):
    spec = _spec(tmp_path)
    unusable = KvmInfo(False, False, "", "no /dev/kvm")
    cache = tmp_path / "accel.json"
    assert (await choose_accel("tcg", spec, cache_file=cache, probe_timeout=1)).accel == "tcg"
    auto = await choose_accel("auto", spec, cache_file=cache, probe_timeout=1, kvm=unusable)
    assert auto.accel == "tcg" and "not usable" in auto.reason
    with pytest.raises(Exception, match="KVM is not usable"):
        await choose_accel("kvm", spec, cache_file=cache, probe_timeout=1, kvm=unusable)
    usable = KvmInfo(True, True, "kvm_intel", "API 12")
    assert (await choose_accel("kvm", spec, cache_file=cache, probe_timeout=1, kvm=usable)).accel == "kvm"


def test_forward_console_line_reemits_agent_json(caplog):
    import logging

    logging.getLogger("cocoon").propagate = True
    with caplog.at_level(logging.DEBUG, logger="cocoon"):
        forward_console_line('{"level":"warning","msg":"module missing","subsystem":"agent","pid":1}', "sb9")
        forward_console_line("[    0.1] Linux version 6.1", "sb9")
        forward_console_line("", "sb9")
    agent = [r for r in caplog.records if r.name == "cocoon.agent"]
    assert agent and agent[0].getMessage() == "module missing"
    assert agent[0].levelname == "WARNING"
    assert agent[0].sandbox == "sb9" and agent[0].guest_pid == 1
    assert any(getattr(r, "line", "") == "[    0.1] Linux version 6.1" for r in caplog.records)


def test_proc_run_errors_carry_command_and_exit_code():
    from cocoon.errors import ProcessError

    with pytest.raises(ProcessError) as info:
        proc.run([sys.executable, "-c", "import sys; sys.stderr.write('nope'); sys.exit(3)"])
    assert info.value.exit_code == 3 and info.value.stderr == "nope"
    with pytest.raises(NotFound):
        proc.run(["/nonexistent/binary"])
    with pytest.raises(ProcessError, match="timed out"):
        proc.run(["sleep", "5"], timeout=0.1)
    assert proc.run(["true"]).returncode == 0


async def test_spawn_kills_and_reaps_on_exit():
    with proc.spawn(["sleep", "30"]) as p:
        pid = p.pid
        assert await proc.wait_exit(p, 0.05) is None
    assert p.returncode is not None
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)


def test_abstract_interface_has_no_registry_entry_without_name():
    class Dummy(Hypervisor):  # pragma: no cover - only registration is tested
        pass

    assert "" not in Hypervisor._registry


def test_argv_nic_on_a_passed_tap_fd(tmp_path):
    from cocoon.hypervisors.base import NetDevice

    nic = NetDevice(id="net0", fd=7, mac="02:11:22:33:44:55", mtu=1400)
    argv = " ".join(build_argv(_spec(tmp_path, nics=(nic,))))
    assert "-netdev tap,id=net0,fd=7" in argv
    assert "-device virtio-net-device,netdev=net0,mac=02:11:22:33:44:55,host_mtu=1400" in argv
    q35 = " ".join(build_argv(_spec(tmp_path, machine="q35", nics=(nic,))))
    assert "virtio-net-pci,netdev=net0" in q35
