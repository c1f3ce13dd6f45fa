"""Bind mounts built with the new mount API, so that read-only applies to every copy and submount.

``mount --rbind`` + ``mount -o remount,bind,ro`` makes only the top mount read-only, and the
remount does not propagate to copies in other mount namespaces (virtiofsd's). Building the bind
detached (``open_tree(OPEN_TREE_CLONE|AT_RECURSIVE)``), setting its attributes recursively
(``mount_setattr``) and only then attaching it (``move_mount``) gets both right. Linux 5.12+.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from cocoon.errors import CocoonError, NotFound
from cocoon.log import get_logger

log = get_logger("storage")

# Same numbers on every architecture (the syscall table was unified from 424 on).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MS_BIND = 0x1000
_MS_PRIVATE = 1 << 18
_MS_SHARED = 1 << 20
_MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(ret: int, what: str, **context: str) -> int:
    if ret >= 0:
        return ret
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        raise CocoonError(f"{what}: the kernel lacks the new mount API (Linux 5.12 or newer is needed)", **context)
    if err == errno.ENOENT:
        raise NotFound(f"{what}: {os.strerror(err)}", **context)
    raise CocoonError(f"{what}: {os.strerror(err)}", errno=errno.errorcode.get(err, str(err)), **context)


def _mount(source: str, target: Path, flags: int) -> None:
    ret = _libc.mount(source.encode(), str(target).encode(), None, ctypes.c_ulong(flags), None)
    _check(int(ret), "mount", target=str(target))


def attach_bind(source: Path, target: Path, *, readonly: bool) -> None:
    """Bind ``source`` (recursively) on ``target`` so that the copies propagating from ``target``'s
    parent already carry ``readonly`` (every submount included)."""
    fd = _check(int(_libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, str(source).encode(),
                                  _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE)),
                "open_tree", source=str(source))  # fmt: skip
    try:
        # Private until attached: nothing mounted later in the source (on the host) follows it.
        attr = _MountAttr(_MOUNT_ATTR_RDONLY if readonly else 0, 0, _MS_PRIVATE, 0)
        _check(int(_libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH | _AT_RECURSIVE, ctypes.byref(attr),
                                 ctypes.sizeof(attr))), "mount_setattr", source=str(source))  # fmt: skip
        _check(int(_libc.syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, str(target).encode(), _MOVE_MOUNT_F_EMPTY_PATH)),
               "move_mount", source=str(source), target=str(target))  # fmt: skip
    finally:
        os.close(fd)


def detach(target: Path) -> None:
    """Lazily unmount ``target`` and everything below it (a no-op when nothing is mounted there)."""
    if int(_libc.umount2(str(target).encode(), _MNT_DETACH)) < 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point (any more)
            log.warning("unmount failed", target=str(target), error=os.strerror(err))


