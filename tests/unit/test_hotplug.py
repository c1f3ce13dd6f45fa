"""Network hot-plug without a VM: the QEMU command line with hot-plug slots, the QMP command
sequences of hotplug_nic/unplug_nic (against a recording stand-in for the QMP connection), and
the argument checks of wired_one and PodInterfaces that fail before touching anything."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.config import Config
from cocoon.errors import HypervisorError, InvalidArgument, NotFound, StateError
from cocoon.hypervisors.base import NetDevice, VMSpec, VMState
from cocoon.hypervisors.qemu import QemuVM, build_argv, kernel_cmdline
from cocoon.network.discover import PodNetworkInfo
from cocoon.network.wiring import wired_one
from cocoon.protocol.types import NetInterface


def _spec(tmp_path: Path, **kw: Any) -> VMSpec:
    return VMSpec(sandbox_id="hp", workdir=tmp_path, kernel=tmp_path / "k", initrd=tmp_path / "i", **kw)


def _devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]


# -- command line --------------------------------------------------------------------------------
def test_argv_without_hotplug_has_no_pcie(tmp_path):
    argv = build_argv(_spec(tmp_path))
    assert "pcie=on" not in argv[argv.index("-M") + 1]
    assert not any("pcie-root-port" in d for d in _devices(argv))
    assert "pcie_ports=native" not in kernel_cmdline(_spec(tmp_path))


def test_argv_microvm_with_hotplug_slots(tmp_path):
    spec = _spec(tmp_path, hotplug_slots=2)
    argv = build_argv(spec)
    assert argv[argv.index("-M") + 1].startswith("microvm,") and argv[argv.index("-M") + 1].endswith(",pcie=on")
    ports = [d for d in _devices(argv) if d.startswith("pcie-root-port")]
    assert ports == ["pcie-root-port,id=hotplug0,chassis=1,bus=pcie.0",
                     "pcie-root-port,id=hotplug1,chassis=2,bus=pcie.0"]  # fmt: skip
    # microvm has no MCFG table: Linux must be told to drive PCIe hot-plug natively.
    assert "pcie_ports=native" in kernel_cmdline(spec).split()


def test_argv_q35_with_hotplug_slots(tmp_path):
    spec = _spec(tmp_path, hotplug_slots=1, machine="q35")
    argv = build_argv(spec)
    assert argv[argv.index("-M") + 1] == "q35"
    assert "pcie-root-port,id=hotplug0,chassis=1,bus=pcie.0" in _devices(argv)
    assert "pcie_ports=native" not in kernel_cmdline(spec)


def test_argv_refuses_too_many_slots(tmp_path):
    with pytest.raises(InvalidArgument, match="too many hot-plug slots") as err:
        build_argv(_spec(tmp_path, hotplug_slots=17))
    assert err.value.context["field"] == "hypervisor.qemu.hotplug_slots"


# -- QMP sequences -------------------------------------------------------------------------------
class RecordingQMP:
    """Records what the driver sends; answers {} or raises for commands in ``fail``; emits
    DEVICE_DELETED after device_del unless ``release`` is False (a guest that keeps the NIC)."""

    def __init__(self, fail: dict[str, str] | None = None, *, release: bool = True) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail = fail or {}
        self.release = release
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.calls.append((command, arguments))
        if command in self.fail:
            raise RuntimeError(self.fail[command])
        if command == "device_del" and self.release:
            assert arguments is not None
            self.events.put_nowait({"event": "DEVICE_DELETED", "data": {"path": "/x/virtio-backend"}})
            self.events.put_nowait({"event": "DEVICE_DELETED", "data": {"device": arguments["id"]}})
        return {}

    def send_fd_scm(self, fd: int) -> None:
        self.calls.append(("SCM_RIGHTS", fd))

    @contextlib.contextmanager
    def listener(self, name: str) -> Iterator[AsyncIterator[dict[str, Any]]]:
        assert name == "DEVICE_DELETED"

        async def events() -> AsyncIterator[dict[str, Any]]:
            while True:
                yield await self.events.get()

        yield events()

    def commands(self) -> list[str]:
        return [c for c, _ in self.calls]


def _running(tmp_path: Path, qmp: RecordingQMP, slots: int = 2) -> QemuVM:
    vm = QemuVM(_spec(tmp_path, hotplug_slots=slots))
    vm._qmp = qmp
    vm.state = VMState.RUNNING
    return vm


NIC = NetDevice("net1", 42, "02:00:00:00:00:01", 1400)


async def test_hotplug_nic_passes_the_fd_then_netdev_then_device(tmp_path):
    qmp = RecordingQMP()
    vm = _running(tmp_path, qmp)
    await vm.hotplug_nic(NIC)
    assert qmp.calls == [
        ("SCM_RIGHTS", 42),
        ("getfd", {"fdname": "net1"}),
        ("netdev_add", {"type": "tap", "id": "net1", "fd": "net1"}),
        ("device_add", {"driver": "virtio-net-pci", "id": "net1-nic", "netdev": "net1", "bus": "hotplug0",
                        "mac": "02:00:00:00:00:01", "host_mtu": 1400}),
    ]  # fmt: skip
    await vm.hotplug_nic(NetDevice("net2", 43, "02:00:00:00:00:02"))
    assert qmp.calls[-1][1]["bus"] == "hotplug1"
    qmp.calls.clear()
    with pytest.raises(HypervisorError, match="no free hot-plug slot") as err:
        await vm.hotplug_nic(NetDevice("net3", 44, "02:00:00:00:00:03"))
    assert err.value.context["slots"] == 2 and qmp.calls == []
    with pytest.raises(HypervisorError, match="plugged already"):
        await vm.hotplug_nic(NIC)


async def test_hotplug_nic_takes_back_the_netdev_when_device_add_fails(tmp_path):
    qmp = RecordingQMP({"device_add": "Bus 'hotplug0' not found"})
    vm = _running(tmp_path, qmp)
    with pytest.raises(HypervisorError, match="device_add: Bus 'hotplug0' not found") as err:
        await vm.hotplug_nic(NIC)
    assert err.value.context["nic"] == "net1" and err.value.context["port"] == "hotplug0"
    assert qmp.commands() == ["SCM_RIGHTS", "getfd", "netdev_add", "device_add", "netdev_del"]
    assert qmp.calls[-1] == ("netdev_del", {"id": "net1"})
    qmp.fail.clear()
    await vm.hotplug_nic(NIC)  # the slot is free again
    assert qmp.calls[-1][1]["bus"] == "hotplug0"


async def test_hotplug_nic_closes_the_named_fd_when_netdev_add_fails(tmp_path):
    qmp = RecordingQMP({"netdev_add": "could not open tap"})
    vm = _running(tmp_path, qmp)
    with pytest.raises(HypervisorError, match="netdev_add: could not open tap"):
        await vm.hotplug_nic(NIC)
    assert qmp.commands() == ["SCM_RIGHTS", "getfd", "netdev_add", "closefd"]
    assert qmp.calls[-1] == ("closefd", {"fdname": "net1"})


async def test_unplug_nic_waits_for_device_deleted_then_drops_the_netdev(tmp_path):
    qmp = RecordingQMP()
    vm = _running(tmp_path, qmp, slots=1)
    await vm.hotplug_nic(NIC)
    qmp.calls.clear()
    await vm.unplug_nic("net1", timeout=2)
    assert qmp.calls == [("device_del", {"id": "net1-nic"}), ("netdev_del", {"id": "net1"})]
    await vm.hotplug_nic(NIC)  # its slot was freed
    with pytest.raises(HypervisorError, match="no hot-plugged NIC"):
        await vm.unplug_nic("net9")


async def test_unplug_nic_that_the_guest_keeps_still_drops_the_netdev(tmp_path):
    qmp = RecordingQMP(release=False)
    vm = _running(tmp_path, qmp, slots=1)
    await vm.hotplug_nic(NIC)
    qmp.calls.clear()
    with pytest.raises(HypervisorError, match="did not release the NIC") as err:
        await vm.unplug_nic("net1", timeout=0.1)
    assert err.value.context["port"] == "hotplug0" and "pciehp" in err.value.context["hint"]
    assert qmp.commands() == ["device_del", "netdev_del"]


async def test_hotplug_needs_a_running_vm(tmp_path):
    vm = QemuVM(_spec(tmp_path, hotplug_slots=1))
    with pytest.raises(StateError, match="cannot hot-plug a NIC"):
        await vm.hotplug_nic(NIC)
    with pytest.raises(StateError, match="cannot unplug a NIC"):
        await vm.unplug_nic("net1")


# -- argument checks before anything is made ----------------------------------------------------
INFO = PodNetworkInfo(netns="/run/netns/x", interfaces=(NetInterface("eth0", "02:00:00:00:00:05", 1500),),
                      indexes=(2,))  # fmt: skip


def test_wired_one_refuses_a_missing_interface_and_model_none():
    with pytest.raises(NotFound, match="no such interface") as err, wired_one(INFO, "eth1", "tcfilter", 1):
        pass
    assert err.value.context["interface"] == "eth1" and err.value.context["found"] == "eth0"
    with pytest.raises(InvalidArgument, match="model none"), wired_one(INFO, "eth0", "none", 1):
        pass


async def test_pod_interfaces_checks_before_wiring(tmp_path):
    from cocoon.api.pod_hotplug import PodInterfaces
    from cocoon.api.pod_network import PodNetwork

    boot = PodNetwork(netns=INFO.netns, model="tcfilter", interfaces=INFO.interfaces,
                      nics=(NetDevice("net0", 7, "02:00:00:00:00:05"),), info=INFO)  # fmt: skip
    pods = PodInterfaces(Config(), INFO.netns, sandbox="sb", boot=boot)
    assert pods.names == ("eth0",)
    no_slots = QemuVM(_spec(tmp_path))
    with pytest.raises(InvalidArgument, match="no hot-plug slots") as err:
        await pods.add(no_slots, None, "eth1")  # type: ignore[arg-type]
    assert err.value.context["interface"] == "eth1" and "hotplug_slots" in err.value.context["hint"]
    with pytest.raises(Exception, match="wired to the VM already"):
        await pods.add(no_slots, None, "eth0")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="only interfaces added while the sandbox runs"):
        await pods.remove(no_slots, "eth0")
    with pytest.raises(NotFound, match="no hot-plugged interface"):
        await pods.remove(no_slots, "eth7")
    await pods.close()
