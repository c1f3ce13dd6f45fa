"""`cocoon check`: can this host run Cocoon, and how?

Each check is a small function returning a :class:`Result` (ok / warn / fail, what
was found, and the fix). The host can run Cocoon when nothing failed.
"""

from __future__ import annotations

import enum
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cocoon.config import Config


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Result:
    name: str
    status: Status
    detail: str
    fix: str = ""


def check_arch(cfg: Config) -> Result:
    from cocoon.errors import HypervisorError
    from cocoon.hypervisors.arch import arch_info, host_arch_name

    try:
        info = arch_info()
    except HypervisorError as exc:
        return Result("architecture", Status.FAIL, str(exc), "run on x86_64 (other architectures: not yet)")
    return Result(
        "architecture", Status.OK, f"{host_arch_name()} (machine {cfg.hypervisor.qemu.machine or info.default_machine})"
    )


def qemu_binary(cfg: Config) -> str | None:
    from cocoon.hypervisors.arch import arch_info

    name = cfg.hypervisor.qemu.path or arch_info().qemu_binary
    return name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)


def check_qemu(cfg: Config) -> Result:
    from cocoon.errors import CocoonError
    from cocoon.util.proc import run

    path = qemu_binary(cfg)
    if path is None:
        return Result("qemu", Status.FAIL, "QEMU binary not found", "apt-get install qemu-system-x86")
    try:
        out = run([path, "--version"], timeout=10).stdout.decode()
    except CocoonError as exc:
        return Result("qemu", Status.FAIL, f"{path} does not run: {exc}", "reinstall qemu-system-x86")
    m = re.search(r"version (\d+\.\d+(\.\d+)?)", out)
    version = m.group(1) if m else "unknown"
    major = int(version.split(".")[0]) if m else 0
    if major and major < 7:
        return Result("qemu", Status.FAIL, f"{path} {version} is too old", "QEMU 7.0 or newer is needed")
    return Result("qemu", Status.OK, f"{path} {version}")


def check_kvm(cfg: Config) -> Result:
    from cocoon.hypervisors.accel import kvm_info

    info = kvm_info()
    requested = cfg.hypervisor.qemu.accel
    if requested == "tcg":
        return Result("kvm", Status.OK, f"not used: accel=tcg configured ({info.detail})")
    if not info.usable:
        status = Status.FAIL if requested == "kvm" else Status.WARN
        return Result(
            "kvm", status, f"KVM not usable: {info.detail}; guests run under TCG (software, slower)",
            "enable virtualization (VT-x/AMD-V) or nested virtualization for this host",
        )  # fmt: skip
    if info.flavor == "kvm_pvm":
        return Result(
            "kvm", Status.WARN,
            "KVM is the nested PVM flavour (kvm_pvm): stock guest kernels do not run on it; "
            "accel=auto probes once and falls back to TCG",
            "use a PVM-enabled guest kernel, or run on a host with kvm_intel/kvm_amd",
        )  # fmt: skip
    return Result("kvm", Status.OK, f"usable ({info.detail}); accel=auto still confirms with a probe boot")


def check_vsock(cfg: Config) -> Result:
    if Path("/dev/vhost-vsock").exists():
        return Result("vhost-vsock", Status.OK, "present: the agent channel can be vsock")
    return Result(
        "vhost-vsock", Status.WARN, "absent: the agent channel is virtio-serial (works, slightly slower to set up)",
        "modprobe vhost_vsock",
    )  # fmt: skip


def check_tun(cfg: Config) -> Result:
    if Path("/dev/net/tun").exists():
        return Result("tun", Status.OK, "/dev/net/tun present (tap devices for VM networking)")
    return Result("tun", Status.WARN, "/dev/net/tun missing: containers get no network", "modprobe tun")


def check_cgroups(cfg: Config) -> Result:
    mounts = Path("/proc/self/mounts").read_text() if Path("/proc/self/mounts").exists() else ""
    v2_unified = any(
        line.split()[1] == "/sys/fs/cgroup" and line.split()[2] == "cgroup2" for line in mounts.splitlines()
    )
    v1 = any(line.split()[2] == "cgroup" for line in mounts.splitlines() if len(line.split()) > 2)
    kind = "v2 (unified)" if v2_unified else ("v1/hybrid" if v1 else "none mounted")
    return Result(
        "cgroups", Status.OK,
        f"host cgroups {kind}; container limits are applied with cgroup v2 inside the guest",
    )  # fmt: skip


def check_virtiofsd(cfg: Config) -> Result:
    path = cfg.runtime.virtiofsd
    if cfg.runtime.shared_fs != "virtio-fs":
        return Result(
            "virtiofsd", Status.FAIL,
            f"shared_fs={cfg.runtime.shared_fs} is not supported yet (the cloud guest kernel has no 9p)",
            'set [runtime] shared_fs = "virtio-fs"',
        )  # fmt: skip
    if os.access(path, os.X_OK):
        return Result("virtiofsd", Status.OK, path)
    return Result(
        "virtiofsd", Status.FAIL, f"{path} not found (needed for shared_fs=virtio-fs)",
        "apt-get install qemu-system-x86",
    )  # fmt: skip


def check_image(cfg: Config) -> Result:
    from cocoon.errors import CocoonError
    from cocoon.image import find_image

    try:
        image = find_image(cfg)
    except CocoonError as exc:
        return Result("guest image", Status.FAIL, str(exc).splitlines()[0], "cocoon image build")
    return Result("guest image", Status.OK, f"{image.kernel} + {image.initrd} ({image.size_bytes // 1024} KiB)")


TMPFS_MAGIC = 0x01021994


def _is_tmpfs(path: str) -> bool:
    """True if ``path`` (or its nearest existing parent) is on a tmpfs."""
    import ctypes
    import ctypes.util

    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    buf = ctypes.create_string_buffer(128)  # struct statfs; f_type is its first field
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.statfs(str(probe).encode(), buf) != 0:
        return False
    return int.from_bytes(buf.raw[:8], "little") == TMPFS_MAGIC


def check_factory(cfg: Config) -> Result:
    f = cfg.factory
    if not f.template:
        return Result("vm templates", Status.OK, "off: every sandbox boots ([factory] template = true restores)")
    if not _is_tmpfs(f.template_dir):
        return Result("vm templates", Status.WARN, f"{f.template_dir} is not on a tmpfs: guest RAM files go to disk",
                      "set [factory] template_dir on a tmpfs such as /dev/shm")  # fmt: skip
    from cocoon.api.factory import list_templates

    return Result("vm templates", Status.OK, f"on, {len(list_templates(cfg))} saved in {f.template_dir}")


CHECKS: tuple[Callable[[Config], Result], ...] = (
    check_arch,
    check_qemu,
    check_kvm,
    check_vsock,
    check_tun,
    check_cgroups,
    check_virtiofsd,
    check_image,
    check_factory,
)


def run_checks(cfg: Config) -> list[Result]:
    """Every check, in order; never raises for a host problem (that is a FAIL line)."""
    return [check(cfg) for check in CHECKS]
