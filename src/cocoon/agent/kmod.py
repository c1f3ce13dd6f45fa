"""Kernel modules: dependency order from ``modules.dep`` (host, at image build) and loading (guest).

Standard library only: the image builder uses the pure functions on the host, the guest's early
init uses :func:`read_list` and :func:`load` to insert the modules the image carries, in the
order the builder wrote to ``/etc/cocoon/modules``.

Loading uses the ``finit_module(2)`` system call through ctypes (the agent needs ctypes anyway for
mount and reboot): no fork/exec of an ``insmod`` per module, which costs milliseconds each under
TCG.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cocoon.errors import CocoonError, NotFound

SYS_FINIT_MODULE_X86_64 = 313
_SYSCALLS = {"x86_64": SYS_FINIT_MODULE_X86_64, "aarch64": 273, "ppc64le": 353, "s390x": 344}


def module_name(path: str) -> str:
    """``kernel/fs/fuse/virtiofs.ko[.xz]`` -> ``virtiofs``; dashes become underscores as in sysfs."""
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Parse ``modules.dep``: module name -> (relative path, relative paths of its dependencies).

    Each line is ``path: dep dep ...``; the dependency list is already transitive.
    """
    out: dict[str, tuple[str, list[str]]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        path, _, deps = line.partition(":")
        out[module_name(path.strip())] = (path.strip(), deps.split())
    return out


@dataclass(frozen=True)
class Resolved:
    """Modules to load in order (relative paths) and the requested names the kernel lacks."""

    order: list[str]
    missing: list[str]
    builtin: list[str]


def resolve_order(
    dep: Mapping[str, tuple[str, list[str]]],
    wanted: Iterable[str],
    *,
    optional: Iterable[str] = (),
    builtin: Iterable[str] = (),
) -> Resolved:
    """Order ``wanted`` (and ``optional``, when the kernel has them) so dependencies load first.

    Dependencies come before their users (depth-first, post-order), each module once, in the
    order asked for. A built-in module (from ``modules.builtin``) needs no loading. A missing
    ``wanted`` module is reported in ``missing``; a missing ``optional`` one is skipped silently.
    """
    builtin_names = {module_name(b) for b in builtin}
    by_path = {path: name for name, (path, _) in dep.items()}
    order: list[str] = []
    seen: set[str] = set()
    missing: list[str] = []
    found_builtin: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in stack:
            raise CocoonError("module dependency cycle", module=name, chain=" -> ".join(stack))
        path, deps = dep[name]
        # modules.dep lists the dependency to load last first: walk it backwards like modprobe.
        for dep_path in reversed(deps):
            dep_name = by_path.get(dep_path, module_name(dep_path))
            if dep_name in dep:
                visit(dep_name, (*stack, name))
        seen.add(name)
        order.append(path)

    optional_names = [module_name(n) for n in optional]
    for raw in [*(module_name(n) for n in wanted), *optional_names]:
        if raw in dep:
            visit(raw, ())
        elif raw in builtin_names:
            if raw not in found_builtin:
                found_builtin.append(raw)
        elif raw not in optional_names and raw not in missing:
            missing.append(raw)
    return Resolved(order, missing, found_builtin)


SIG_MAGIC = b"~Module signature appended~\n"


def strip_signature(data: bytes) -> bytes:
    """A module file without its appended signature (unchanged if it has none).

    The kernel verifies a signature at every load (RSA + SHA-256, slow under TCG); an unsigned
    module loads all the same when signatures are not enforced, and taints the kernel with 'E'.
    Layout: module, signature, ``struct module_signature`` (12 bytes, sig_len big-endian last),
    magic string.
    """
    if not data.endswith(SIG_MAGIC) or len(data) < len(SIG_MAGIC) + 12:
        return data
    sig_len = int.from_bytes(data[-len(SIG_MAGIC) - 4:-len(SIG_MAGIC)], "big")
    end = len(data) - len(SIG_MAGIC) - 12 - sig_len
    if end <= 0:
        raise CocoonError("bad module signature trailer", sig_len=sig_len)
    return data[:end]


# What the agent channel needs; everything else may load after the agent answers.
EARLY_MODULES = frozenset({
    "virtio_ring", "virtio", "virtio_mmio", "virtio_pci", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
    "virtio_console", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
})
_PCI_ONLY = frozenset({"virtio_pci", "virtio_pci_legacy_dev", "virtio_pci_modern_dev"})
_MMIO_ONLY = frozenset({"virtio_mmio"})


def select(paths: Sequence[str], *, early: bool | None = None, has_pci: bool = True,
           has_mmio: bool = True) -> list[str]:
    """Filter an ordered module list, keeping its order.

    ``early`` True keeps only :data:`EARLY_MODULES`, False only the others, None all. A machine
    without a PCI bus (microvm) skips the virtio-pci transport, one without virtio-mmio devices
    (q35, pc) skips virtio-mmio. Dependencies of the early set are early themselves, so loading
    the early part first and the rest later keeps dependency order.
    """
    out = []
    for path in paths:
        name = module_name(path)
        if early is not None and (name in EARLY_MODULES) != early:
            continue
        if (not has_pci and name in _PCI_ONLY) or (not has_mmio and name in _MMIO_ONLY):
            continue
        out.append(path)
    return out


def read_list(text: str) -> list[str]:
    """Parse ``/etc/cocoon/modules``: one module path a line; blank lines and ``#`` comments ignored."""
    return [s for s in (line.split("#", 1)[0].strip() for line in text.splitlines()) if s]


def render_list(paths: Sequence[str], *, header: str = "") -> str:
    """The text of ``/etc/cocoon/modules`` for ``paths`` (already ordered)."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    return "\n".join([*lines, *paths]) + "\n"


def is_loaded(name: str, sys_module: str = "/sys/module") -> bool:
    """True when the kernel has the module (loaded, or built in with parameters)."""
    return os.path.isdir(os.path.join(sys_module, module_name(name)))


def load(path: str, params: str = "") -> bool:
    """Insert the module file at ``path`` with ``finit_module``; False if it was already loaded.

    Raises NotFound for a missing file and CocoonError (with ``errno``) when the kernel refuses.
    """
    import ctypes

    machine = os.uname().machine
    nr = _SYSCALLS.get(machine)
    if nr is None:
        raise CocoonError("finit_module: unsupported architecture", machine=machine)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFound("kernel module file missing", path=path) from exc
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.syscall(nr, fd, params.encode(), 0)
    finally:
        os.close(fd)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False
    raise CocoonError("finit_module failed", path=path, errno=errno.errorcode.get(err, str(err)),
                      error=os.strerror(err))
