"""Per-architecture facts in one table: QEMU binary, machines, console, kernel parameters.

Adding aarch64, ppc64le or s390x means filling in a row here, not editing drivers.
Rows marked ``supported=False`` give a clear "not yet" error naming the architecture.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from cocoon.errors import HypervisorError


@dataclass(frozen=True)
class MachineInfo:
    """One QEMU machine type as we use it."""

    qemu_machine: str  # the -M value, options included
    bus: str  # "mmio" (virtio-*-device) or "pci" (virtio-*-pci)
    boot_kernel: str  # "vmlinux" (PVH/ELF direct boot) or "bzImage"


@dataclass(frozen=True)
class ArchInfo:
    """Everything architecture-specific the runtime needs."""

    name: str
    supported: bool
    qemu_binary: str = ""
    default_machine: str = ""
    machines: dict[str, MachineInfo] = field(default_factory=dict)
    console: str = ""  # kernel console device
    kernel_params: tuple[str, ...] = ()
    tcg_cpu: str = "max"
    kvm_cpu: str = "host"
    reason: str = ""


# Kata-style parameters that shave boot time and make TCG guests behave (see docs/hypervisor.md).
_COMMON_PARAMS = (
    "reboot=k",
    "panic=-1",
    "no_timer_check",
    "rcupdate.rcu_expedited=1",
    "cryptomgr.notests",
    "mitigations=off",
    "nokaslr",
    "random.trust_cpu=on",
    "quiet",
)

ARCHES: dict[str, ArchInfo] = {
    "x86_64": ArchInfo(
        name="x86_64",
        supported=True,
        qemu_binary="qemu-system-x86_64",
        default_machine="microvm",
        machines={
            "microvm": MachineInfo(
                "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=on,pic=on,acpi=on", "mmio", "vmlinux"
            ),
            "q35": MachineInfo("q35", "pci", "bzImage"),
        },
        console="ttyS0",
        kernel_params=(*_COMMON_PARAMS, "tsc=reliable", "noreplace-smp", "i8042.noaux", "8250.nr_uarts=1"),
    ),
    "aarch64": ArchInfo(
        name="aarch64", supported=False, reason="not yet: needs a virt machine row, PL011 console"
    ),
    "ppc64le": ArchInfo(name="ppc64le", supported=False, reason="not yet: needs a pseries row and an hvc console"),
    "s390x": ArchInfo(name="s390x", supported=False, reason="not yet: needs an s390-ccw-virtio row and virtio-ccw"),
}


def host_arch_name() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def arch_info(name: str | None = None) -> ArchInfo:
    """The table row for ``name`` (default: this host); raises for unknown or not-yet rows."""
    key = name or host_arch_name()
    info = ARCHES.get(key)
    if info is None:
        raise HypervisorError(f"architecture {key} is not known", arch=key)
    if not info.supported:
        raise HypervisorError(f"architecture {key} is not supported yet", arch=key, reason=info.reason)
    return info


def machine_info(info: ArchInfo, machine: str = "") -> MachineInfo:
    name = machine or info.default_machine
    try:
        return info.machines[name]
    except KeyError:
        raise HypervisorError(
            f"machine type {name!r} is not supported on {info.name}",
            arch=info.name,
            known=",".join(sorted(info.machines)),
        ) from None


def tsc_khz() -> int | None:
    """The host TSC frequency in kHz, for ``tsc_early_khz`` (microvm guests can hang without it)."""
    sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
    try:
        return int(sysfs.read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        return None
    return None
