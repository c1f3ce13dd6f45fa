"""Mount the root filesystem containerd hands a shim (``CreateTaskRequest.rootfs``) on ``<bundle>/rootfs``.

containerd's snapshotters describe a container's root as mounts (overlay with ``lowerdir=...``,
or a bind of a directory); the shim must mount them on the bundle's ``rootfs`` and unmount it on
delete, also when the shim died and ``shim delete`` cleans up. From there the rootfs reaches the
guest like any bundle's: bound into the sandbox share and exported by virtiofsd.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cocoon.errors import CocoonError, InvalidArgument
from cocoon.log import get_logger

log = get_logger("storage")

_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 0x2

# fstab flag options -> (set, clear) of mount(2) flags; the rest is the filesystem's data string.
_FLAGS: dict[str, tuple[int, int]] = {
    "ro": (0x1, 0), "rw": (0, 0x1),
    "nosuid": (0x2, 0), "suid": (0, 0x2),
    "nodev": (0x4, 0), "dev": (0, 0x4),
    "noexec": (0x8, 0), "exec": (0, 0x8),
    "sync": (0x10, 0), "async": (0, 0x10),
    "remount": (0x20, 0),
    "noatime": (0x400, 0), "atime": (0, 0x400),
    "nodiratime": (0x800, 0), "diratime": (0, 0x800),
    "bind": (0x1000, 0), "rbind": (0x1000 | 0x4000, 0),
    "relatime": (0x200000, 0), "norelatime": (0, 0x200000),
    "strictatime": (0x1000000, 0),
}  # fmt: skip
_MS_BIND = 0x1000
_MS_RDONLY = 0x1
_MS_REMOUNT = 0x20


@dataclass(frozen=True, slots=True)
class RootfsMount:
    """One mount of ``CreateTaskRequest.rootfs`` (containerd.types.Mount)."""

    type: str
    source: str
    options: tuple[str, ...] = ()


def split_options(options: Iterable[str]) -> tuple[int, str]:
    """mount(2) flags and the data string for fstab-style ``options``."""
    flags, data = 0, []
    for opt in options:
        if opt in _FLAGS:
            on, off = _FLAGS[opt]
            flags = (flags | on) & ~off
        else:
            data.append(opt)
    return flags, ",".join(data)


def _mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    ret = _libc.mount(source.encode(), str(target).encode(), fstype.encode() if fstype else None,
                      ctypes.c_ulong(flags), data.encode() if data else None)  # fmt: skip
    if int(ret) < 0:
        err = ctypes.get_errno()
        raise CocoonError(f"mount rootfs: {os.strerror(err)}", type=fstype or "bind", source=source,
                          target=str(target), errno=errno.errorcode.get(err, str(err)))  # fmt: skip


def mount_rootfs(mounts: Iterable[RootfsMount], target: Path) -> bool:
    """Mount ``mounts`` on ``target`` in order (created if missing). True if anything was mounted.

    An empty list means the bundle brings its own rootfs (nothing to do). A failure unmounts what
    this call mounted before raising.
    """
    done = 0
    items = list(mounts)
    if not items:
        return False
    target.mkdir(mode=0o711, exist_ok=True)
    try:
        for m in items:
            if not m.type:
                raise InvalidArgument("rootfs mount without a type", field="rootfs.type", source=m.source)
            flags, data = split_options(m.options)
            bind = m.type == "bind" or bool(flags & _MS_BIND)
            fstype = "" if bind else m.type
            _mount(m.source, target, fstype, flags & ~_MS_RDONLY if bind else flags, "" if bind else data)
            done += 1
            if bind and flags & _MS_RDONLY:  # a bind is made read-only by a remount
                _mount("", target, "", _MS_BIND | _MS_REMOUNT | _MS_RDONLY, "")
            log.debug("rootfs mounted", type=m.type, source=m.source, target=str(target))
    except BaseException:
        for _ in range(done):
            unmount_rootfs(target)
        raise
    return True


def unmount_rootfs(target: Path) -> None:
    """Lazily unmount whatever is mounted on ``target`` (a no-op when nothing is)."""
    if int(_libc.umount2(str(target).encode(), _MNT_DETACH)) < 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            log.warning("cannot unmount rootfs", target=str(target), error=os.strerror(err))


def is_mounted(path: Path) -> bool:
    """True if ``path`` is a mount point (per /proc/self/mountinfo)."""
    want = str(path).rstrip("/")
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4].replace("\\040", " ") == want for line in fh)
