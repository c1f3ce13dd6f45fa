"""Choosing the accelerator at run time: KVM when a probe boot shows it works, else TCG.

``/dev/kvm`` answering is not enough: under a nested PVM host (kvm_pvm) KVM exists
but a stock guest kernel cannot run on it (QEMU stops with "KVM internal error").
So ``auto`` boots our own kernel + initrd to the bare marker under KVM with a
deadline, once per (host kernel, guest kernel, QEMU) and caches the answer.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cocoon.errors import CocoonError
from cocoon.hypervisors.base import AccelName, VMSpec
from cocoon.log import get_logger
from cocoon.util import proc as procs

log = get_logger("hypervisor")

KVM_GET_API_VERSION = 0xAE00
BARE_MARKER = b"COCOON-BARE-READY"


@dataclass(frozen=True)
class KvmInfo:
    """What /dev/kvm looks like on this host."""

    present: bool
    usable: bool
    flavor: str  # kvm_intel, kvm_amd, kvm_pvm (nested, pagetable-based), or ""
    detail: str


@dataclass(frozen=True)
class AccelChoice:
    accel: AccelName
    reason: str
    probed: bool = False


def kvm_info(dev: str = "/dev/kvm", sys_module: str = "/sys/module") -> KvmInfo:
    """Whether /dev/kvm exists and answers KVM_GET_API_VERSION, and which module backs it."""
    flavor = next((m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if Path(sys_module, m).exists()), "")
    if not Path(dev).exists():
        return KvmInfo(False, False, flavor, f"{dev} does not exist")
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmInfo(True, False, flavor, f"cannot open {dev}: {exc.strerror}")
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return KvmInfo(True, False, flavor, f"KVM_GET_API_VERSION failed: {exc.strerror}")
    finally:
        os.close(fd)
    if version != 12:
        return KvmInfo(True, False, flavor, f"unexpected KVM API version {version}")
    return KvmInfo(True, True, flavor, f"API {version}" + (f", module {flavor}" if flavor else ""))


def _probe_key(spec: VMSpec) -> str:
    h = hashlib.sha256()
    h.update(platform.release().encode())
    for path in (spec.kernel, spec.binary):
        try:
            st = os.stat(path)
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(str(path).encode())
    return h.hexdigest()[:16]


async def probe_kvm(spec: VMSpec, timeout: float) -> tuple[bool, str]:
    """Boot ``spec`` under KVM to the bare init's marker; True if it got there in time."""
    from cocoon.hypervisors.qemu import build_argv

    spec.workdir.mkdir(parents=True, exist_ok=True)
    console = spec.workdir / "console.log"
    console.unlink(missing_ok=True)
    argv = build_argv(spec)
    started = time.monotonic()
    qemu_log = spec.workdir / "qemu.log"
    exit_code: int | None = None
    with qemu_log.open("wb") as out, procs.spawn(argv, stdout=out, stderr=out, grace=0.2) as proc:
        while time.monotonic() - started < timeout:
            if console.exists() and BARE_MARKER in console.read_bytes():
                return True, f"guest booted under KVM in {time.monotonic() - started:.2f}s"
            exit_code = proc.poll()
            if exit_code is not None:
                break
            await asyncio.sleep(0.02)
    tail = console.read_bytes()[-300:].decode(errors="replace") if console.exists() else ""
    qemu_err = qemu_log.read_bytes()[-300:].decode(errors="replace").strip()
    if "KVM internal error" in qemu_err:
        why = "KVM internal error (guest kernel cannot run on this KVM)"
    elif exit_code is not None:
        last = qemu_err.splitlines()[-1] if qemu_err else ""
        why = f"qemu exited with {exit_code} under KVM: {last}"[:200]
    else:
        why = f"no marker within {timeout:.0f}s"
    log.debug("kvm probe failed", console_tail=tail, qemu_stderr=qemu_err)
    return False, why


async def choose_accel(
    requested: str,
    spec: VMSpec,
    *,
    cache_file: Path,
    probe_timeout: float,
    kvm: KvmInfo | None = None,
) -> AccelChoice:
    """Resolve ``auto``/``kvm``/``tcg`` to the accelerator to use (probing and caching for auto)."""
    if requested == "tcg":
        return AccelChoice("tcg", "configured")
    info = kvm or kvm_info()
    if requested == "kvm":
        if not info.usable:
            raise CocoonError("accel=kvm configured but KVM is not usable", detail=info.detail)
        return AccelChoice("kvm", "configured")
    if not info.usable:
        return AccelChoice("tcg", f"KVM not usable ({info.detail})")
    key = _probe_key(spec)
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return AccelChoice(cached["accel"], cached["reason"] + " (cached probe)", probed=False)
    except (OSError, ValueError, KeyError):
        pass
    import shutil
    import tempfile

    # A short private dir: unix socket paths must stay under 108 bytes whatever the caller's workdir.
    probe_dir = Path(tempfile.mkdtemp(prefix="cocoon-kvm-probe-"))
    probe_spec = replace(
        spec,
        accel="kvm",
        workdir=probe_dir,
        shared_dirs=(),  # the probe must not take a virtiofsd's one connection
        nics=(),  # nor the pod's tap queues
        shared_memory=False,
        kernel_params=(*spec.kernel_params, "rdinit=/sbin/bare-init"),
    )
    try:
        ok, why = await probe_kvm(probe_spec, probe_timeout)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    choice = AccelChoice("kvm", why, True) if ok else AccelChoice("tcg", f"KVM probe failed: {why}", True)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, **asdict(choice)}))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return choice
