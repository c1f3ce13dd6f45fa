"""Storages: what the agent mounts in the guest before a container needs it.

Drivers (``Storage.driver``), after Kata's storage handlers:

* ``virtio-fs``: ``mount -t virtiofs <tag> <mount_point>``, ``source`` is the share's tag.
* ``tmpfs``: a tmpfs (``options`` may carry ``size=``, ``mode=``).
* ``local``: a directory the agent creates (``mode=`` in ``options``; default 0777 like Kata's
  local volumes, which containers running as any user write to).

Mounting is the mount(2) system call through ctypes: no fork of a mount binary per storage.
Pure parts (option parsing, validation) are tested on the host.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import time
from dataclasses import dataclass

from cocoon.errors import InvalidArgument, ProcessError
from cocoon.log import get_logger
from cocoon.protocol.types import Storage

log = get_logger("agent")

DRIVERS = ("virtio-fs", "tmpfs", "local")

# <sys/mount.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 0x1, 0x2, 0x4, 0x8, 0x10
MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 0x80, 0x400, 0x800, 0x200000, 0x1000000
MNT_DETACH = 2

# option -> (flags to set, flags to clear)
_FLAGS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0),
    "defaults": (0, 0),
}  # fmt: skip


def parse_options(options: tuple[str, ...] | list[str]) -> tuple[int, str]:
    """Mount options -> (mount flags, data string for the file system)."""
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAGS:
            on, off = _FLAGS[opt]
            flags = (flags | on) & ~off
        elif opt:
            data.append(opt)
    return flags, ",".join(data)


def check_mount_point(path: str) -> str:
    """An absolute, normalized guest path other than / (InvalidArgument otherwise)."""
    if not path.startswith("/") or os.path.normpath(path) != path or path == "/" or "\0" in path:
        raise InvalidArgument("storage mount point must be an absolute, normalized path", field="mount_point",
                              value=path)
    return path


def validate(storage: Storage) -> None:
    """Refuse a storage the agent cannot handle, before anything is mounted."""
    if storage.driver not in DRIVERS:
        raise InvalidArgument(f"unsupported storage driver {storage.driver!r}", field="driver",
                              supported=",".join(DRIVERS))
    check_mount_point(storage.mount_point)
    if storage.driver == "virtio-fs" and not storage.source:
        raise InvalidArgument("virtio-fs storage needs the share's tag as source", field="source")


def local_mode(options: tuple[str, ...]) -> int:
    """``mode=`` of a local storage's options (octal), default 0777."""
    for opt in options:
        if opt.startswith("mode="):
            try:
                return int(opt[5:], 8) & 0o7777
            except ValueError:
                raise InvalidArgument("bad mode option", field="options", value=opt) from None
    return 0o777


@dataclass
class Mounted:
    """A storage the agent set up, and what undoing it takes."""

    storage: Storage
    created: bool  # the agent created the mount point (removed again when empty)
    mounted: bool


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2); OSError on failure."""
    rc = _libc().mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                       data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def sys_umount(target: str, flags: int = 0) -> None:
    """umount2(2); OSError on failure."""
    if _libc().umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


#: How long a virtio-fs tag may take to appear: a share hot-plugged into a restored template VM
#: is probed by the guest's PCI hot-plug driver a moment after the host added it.
VIRTIOFS_TAG_WAIT = 10.0


def _mount_virtiofs(tag: str, mp: str, fstype: str, flags: int, data: str) -> None:
    deadline = time.monotonic() + VIRTIOFS_TAG_WAIT
    while True:
        try:
            sys_mount(tag, mp, fstype, flags, data)
            return
        except OSError as exc:
            # "tag not found" is EINVAL until the device is probed.
            if exc.errno != errno.EINVAL or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def mount_storage(storage: Storage) -> Mounted:
    """Set ``storage`` up in the guest (mkdir and, but for ``local``, mount)."""
    validate(storage)
    mp = storage.mount_point
    created = not os.path.exists(mp)
    try:
        if storage.driver == "local":
            os.makedirs(mp, exist_ok=True)
            os.chmod(mp, local_mode(storage.options))
            return Mounted(storage, created=created, mounted=False)
        os.makedirs(mp, exist_ok=True)
        flags, data = parse_options(storage.options)
        if storage.driver == "virtio-fs":
            _mount_virtiofs(storage.source, mp, storage.fstype or "virtiofs", flags, data)
        else:
            sys_mount(storage.source or "tmpfs", mp, "tmpfs", flags, data)
    except OSError as exc:
        if created:
            _rmdir(mp)
        raise ProcessError(f"mount storage: {exc.strerror}", driver=storage.driver, source=storage.source,
                           mount_point=mp, errno=exc.errno) from exc
    log.info("storage mounted", driver=storage.driver, source=storage.source, mount_point=mp)
    return Mounted(storage, created=created, mounted=True)


def unmount_storage(m: Mounted) -> None:
    """Undo :func:`mount_storage`: unmount (lazily when busy) and remove what the agent created."""
    mp = m.storage.mount_point
    if m.mounted:
        try:
            sys_umount(mp)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                sys_umount(mp, MNT_DETACH)
            elif exc.errno not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
                raise ProcessError(f"unmount storage: {exc.strerror}", mount_point=mp, errno=exc.errno) from exc
        m.mounted = False
    if m.created:
        if m.storage.driver == "local":
            shutil.rmtree(mp, ignore_errors=True)
        else:
            _rmdir(mp)
        m.created = False


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as exc:
        log.debug("mount point left in place", path=path, error=exc.strerror)
