"""VM templating: boot a template VM once per VM shape, save it, start sandboxes by restoring it.

Cold boot under TCG takes seconds (the kernel, then Python and the agent's imports); restoring a
saved guest takes a fraction of a second. ``[factory] template = true`` turns it on.

* **Template** (``ensure_template``, once per shape: kernel, initrd, accelerator, guest size,
  machine, ...; keyed by :func:`template_key`): a VM with no shares and no NICs but
  ``EXTRA_SLOTS`` free PCIe hot-plug ports, its RAM in a file (``ram``) on a tmpfs. Once its agent
  answers ``PrepareSnapshot`` (late modules loaded), the host hands the agent channel back
  (:meth:`Hypervisor.agent_handover`) and saves the device state (``state``; the RAM stays in
  ``ram``, QEMU's x-ignore-shared). Built under a lock in a temporary directory, renamed when
  complete: a half-built template is never used.
* **Clone** (:func:`clone`): a sparse copy of ``ram`` (a private copy: virtiofsd must map the
  clone's own memory, so copy-on-write mappings of one file cannot be used), a QEMU started
  ``-incoming`` on it, then (``GuestVM``) a fresh random seed and clock for the guest and the
  sandbox's shares and NICs hot-plugged. The copy is unlinked as soon as QEMU holds it: nothing
  is left on disk by a clone, however it ends.

Sandboxes whose device set does not fit the template's free ports boot cold (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cocoon import __version__
from cocoon.config import Config
from cocoon.errors import HypervisorError
from cocoon.hypervisors.base import VMSpec
from cocoon.log import get_logger
from cocoon.util.fs import write_atomic

log = get_logger("factory")

TEMPLATE_SANDBOX = "template"
#: PCIe root ports a template keeps free for its clones: their shares (one per sandbox) and NICs.
EXTRA_SLOTS = 4


@dataclass(frozen=True)
class Template:
    """A saved template VM: ``state`` (device state) and ``ram`` (guest memory) in ``directory``."""

    directory: Path

    @property
    def ram(self) -> Path:
        return self.directory / "ram"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    @property
    def meta(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.directory / "meta.json").read_text())
        return data


def template_spec(spec: VMSpec) -> VMSpec:
    """The shape a template for ``spec`` boots with: no shares or NICs (clones hot-plug theirs),
    ``EXTRA_SLOTS`` more hot-plug ports, shared RAM."""
    return replace(spec, sandbox_id=TEMPLATE_SANDBOX, shared_dirs=(), nics=(), shared_memory=True,
                   hotplug_slots=spec.hotplug_slots + EXTRA_SLOTS, memory_file=None, incoming=None)  # fmt: skip


def _file_id(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def template_key(spec: VMSpec) -> str:
    """What makes two sandboxes able to share a template (a file name)."""
    t = template_spec(spec)
    facts = {
        "cocoon": __version__, "arch": platform.machine(), "kernel": _file_id(t.kernel),
        "initrd": _file_id(t.initrd), "memory_mib": t.memory_mib, "vcpus": t.vcpus, "accel": t.accel,
        "channel": t.channel, "kernel_params": list(t.kernel_params), "machine": t.machine, "binary": t.binary,
        "tcg_tb_size_mib": t.tcg_tb_size_mib, "hotplug_slots": t.hotplug_slots, "extra_args": list(t.extra_args),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def unfit(spec: VMSpec) -> str:
    """Why ``spec`` cannot start from a template ("" if it can)."""
    missing = [str(p) for p in (spec.kernel, spec.initrd) if not Path(p).is_file()]
    if missing:  # the driver's own start reports it (HypervisorError naming the file)
        return f"guest image file not found: {', '.join(missing)}"
    if spec.channel != "virtio-serial":
        return "templates need the virtio-serial agent channel"
    if len(spec.shared_dirs) + len(spec.nics) > EXTRA_SLOTS:
        return f"more than {EXTRA_SLOTS} shares and NICs"
    if spec.extra_args:
        return "extra VMM arguments"
    return ""


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def ensure_template(cfg: Config, spec: VMSpec) -> Template:
    """The template for ``spec``'s shape, built first if there is none (one builder at a time)."""
    base = Path(cfg.factory.template_dir)
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(base, 0o700)  # guest memory lives here, whoever made the directory
    key = template_key(spec)
    template = Template(base / key)
    if (template.directory / "meta.json").exists():
        return template
    fd = await asyncio.to_thread(_lock, base / f"{key}.lock")
    try:
        if not (template.directory / "meta.json").exists():
            await build_template(cfg, spec, template.directory)
            prune(cfg, keep=template.directory.name)
    finally:
        os.close(fd)
    return template


#: Templates kept (the most recently used); each holds its guest's touched RAM (~120 MiB) on tmpfs.
MAX_TEMPLATES = 6
#: A template used this recently is never pruned: a clone may be copying its RAM right now.
PRUNE_IDLE_SECONDS = 600.0


def _owner_pid(name: str) -> int | None:
    """The PID in a build directory (``<key>.tmp<pid>``) or a clone's RAM copy
    (``clone-<id>-<pid>-<ns>.ram``) name; None for a template."""
    with contextlib.suppress(ValueError, IndexError):
        if ".tmp" in name:
            return int(name.rsplit(".tmp", 1)[1])
        if name.startswith("clone-") and name.endswith(".ram"):
            return int(name.split("-")[-2])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune(cfg: Config, *, keep: str = "") -> list[str]:
    """Remove templates that cannot be used any more (their kernel or initrd is gone) and, beyond
    ``MAX_TEMPLATES``, the least recently used; never ``keep`` nor one used in the last
    ``PRUNE_IDLE_SECONDS``. The keys removed."""
    base = Path(cfg.factory.template_dir)
    now = time.time()
    entries = []
    kept = 0  # templates there now
    for entry in base.iterdir() if base.is_dir() else ():
        owner = _owner_pid(entry.name)
        if owner is not None:  # a build or a clone's RAM copy whose process died half-way
            if _alive(owner):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                remove_quietly(entry)
            continue
        meta_file = entry / "meta.json"
        if not meta_file.is_file():
            continue
        kept += 1
        if entry.name == keep:
            continue
        used = meta_file.stat().st_mtime  # touched by every clone
        if now - used < PRUNE_IDLE_SECONDS:
            continue
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            meta = {}
        stale = not all(Path(str(meta.get(k, ""))).is_file() for k in ("kernel", "initrd"))
        entries.append((stale, used, entry))
    removed = []
    for stale, _, entry in sorted(entries, key=lambda e: (not e[0], e[1])):  # stale first, then oldest
        if not stale and kept <= MAX_TEMPLATES:
            break
        shutil.rmtree(entry, ignore_errors=True)
        remove_quietly(entry.with_name(f"{entry.name}.lock"))
        removed.append(entry.name)
        kept -= 1
    if removed:
        log.info("templates pruned", keys=",".join(removed))
    return removed


async def build_template(cfg: Config, spec: VMSpec, directory: Path) -> None:
    """Boot, quiesce and save a template for ``spec`` into ``directory`` (replaced if present)."""
    from cocoon.api.guest import connect_agent
    from cocoon.hypervisors.base import get_driver

    started = time.monotonic()
    tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    try:
        tspec = replace(template_spec(spec), workdir=tmp, memory_file=tmp / "ram")
        vm = get_driver(cfg.hypervisor.driver)(tspec)
        try:
            await vm.start()
            agent = await connect_agent(cfg, vm, started, TEMPLATE_SANDBOX)
            try:
                await agent.prepare_snapshot(timeout=cfg.hypervisor.qemu.boot_timeout)
            finally:
                await vm.agent_handover(agent.close)
            await vm.save(tmp / "state")
        finally:
            await vm.stop(timeout=0)
        meta: dict[str, Any] = {
                "key": directory.name, "created": time.time(), "boot_seconds": round(time.monotonic() - started, 3),
                "memory_mib": tspec.memory_mib, "vcpus": tspec.vcpus, "accel": tspec.accel,
                "hotplug_slots": tspec.hotplug_slots, "kernel": str(tspec.kernel), "initrd": str(tspec.initrd),
                "ram_bytes": (tmp / "ram").stat().st_blocks * 512}  # fmt: skip
        write_atomic(tmp / "meta.json", json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("template saved", key=directory.name, seconds=meta["boot_seconds"], ram_mib=int(meta["ram_bytes"]) >> 20)


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new file ``dst`` keeping its holes (a guest's untouched RAM stays unallocated)."""
    # Guest memory: readable by its owner only (the directory is 0700 as well).
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(src, "rb") as fin, open(fd, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            pos = data
            while pos < hole:
                copied = os.copy_file_range(fin.fileno(), fout.fileno(), hole - pos, pos, pos)
                if copied == 0:
                    raise HypervisorError("template RAM file shrank while copying", path=str(src))
                pos += copied
            offset = hole


def clone(cfg: Config, template: Template, spec: VMSpec) -> VMSpec:
    """The spec of a clone of ``template`` for ``spec`` (its workdir and id), with a fresh copy
    of the template's RAM; the caller unlinks that copy (``memory_file``) once the VMM holds it."""
    ram = Path(cfg.factory.template_dir) / f"clone-{spec.sandbox_id[:40]}-{os.getpid()}-{time.monotonic_ns()}.ram"
    with contextlib.suppress(OSError):
        os.utime(template.directory / "meta.json")  # last use, for prune()
    try:
        copy_sparse(template.ram, ram)
    except OSError as exc:
        remove_quietly(ram)
        raise HypervisorError(f"cannot copy the template's RAM: {exc.strerror}", path=str(template.ram),
                              hint="cocoon factory destroy (templates are rebuilt on demand)") from exc
    return replace(template_spec(spec), sandbox_id=spec.sandbox_id, workdir=spec.workdir, memory_file=ram,
                   incoming=template.state)  # fmt: skip


def remove_quietly(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove(template: Template) -> None:
    """Remove one template (a broken one: the next sandbox of its shape builds it again)."""
    shutil.rmtree(template.directory, ignore_errors=True)


def destroy_templates(cfg: Config) -> list[str]:
    """Remove every saved template (``cocoon factory destroy``); the keys removed."""
    base = Path(cfg.factory.template_dir)
    removed = []
    if base.is_dir():
        for entry in sorted(base.iterdir()):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
            elif entry.suffix == ".lock":
                remove_quietly(entry)
    return removed


def list_templates(cfg: Config) -> list[dict[str, Any]]:
    """The saved templates' metadata (``cocoon factory status``)."""
    base = Path(cfg.factory.template_dir)
    if not base.is_dir():
        return []
    found = []
    for entry in sorted(base.iterdir()):
        if (entry / "meta.json").is_file():
            found.append(Template(entry).meta)
    return found


async def init_default(cfg: Config, *, memory_mib: int = 0, vcpus: int = 0) -> Template:
    """The template for a guest of this size (default: the configured one), built if missing
    (``cocoon factory init``): sandboxes sized from their limits use the template of their size."""
    import tempfile

    from cocoon.api.guest import GuestVM

    with tempfile.TemporaryDirectory(prefix="factory-") as tmp:
        spec = await GuestVM(cfg, TEMPLATE_SANDBOX, Path(tmp), memory_mib=memory_mib, vcpus=vcpus).vm_spec()
    return await ensure_template(cfg, spec)
