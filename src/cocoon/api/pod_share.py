"""The share of a pod sandbox: one directory, one virtiofsd, containers added and removed while both run.

Layout (what :func:`cocoon.storage.shared.plan` computes for each container)::

    <root>/                       a bind mount of itself, propagation "shared"
    <root>/<container id>/rootfs  <- the bundle's rootfs
    <root>/<container id>/mounts/<n>  <- the source of the spec's n-th mount (bind mounts only)

**How mounts made after virtiofsd started reach it.** In its default ``sandbox=namespace`` mode
virtiofsd (QEMU 7.2) unshares a mount namespace once the VMM connects, makes every mount there a
slave (``MS_REC|MS_SLAVE`` on ``/``) and pivots into the shared directory. :meth:`PodShare.open`
therefore makes the share root a mount of its own with *shared* propagation before virtiofsd
starts: its copy in virtiofsd's namespace is then a slave of it, and every mount attached below
the root later propagates there; unmounting on the host propagates the removal (checked in
``/proc/<virtiofsd>/mountinfo``, see tests/functional/test_sandbox_api.py). Kata Containers shares
its ``mounts/`` directory the same way. Nothing flows back: the copies in virtiofsd are slaves.

**Read-only binds.** ``mount --rbind`` + ``mount -o remount,bind,ro`` (what the CLI path does
before virtiofsd starts) is not enough here: the remount is per mount and does not propagate, so
virtiofsd's copy stayed writable (verified). Each bind is therefore built detached with the new
mount API (``open_tree(OPEN_TREE_CLONE|AT_RECURSIVE)``, ``mount_setattr(MOUNT_ATTR_RDONLY,
AT_RECURSIVE)``) and only then attached (``move_mount``): the copy that propagates is read-only
from the start, submounts included. This needs Linux 5.12 (Debian 12 has 6.1).

Removal never recurses into what was bind-mounted: each bind is detached (``umount2(MNT_DETACH)``,
lazy because virtiofsd may still hold inodes for a moment), and only directories and placeholder
files created here are removed, once nothing is mounted below the container's directory.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cocoon.errors import AlreadyExists
from cocoon.log import get_logger
from cocoon.oci.model import Spec
from cocoon.storage import shared
from cocoon.storage.mounts import _MS_BIND, _MS_PRIVATE, _MS_SHARED, _mount, attach_bind, detach

log = get_logger("storage")

@dataclass
class _Entry:
    """What one container put into the share: mount points, then directories/files created for them."""

    targets: list[Path] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)


class PodShare:
    """The directory a pod sandbox exports to its VM; containers come and go while virtiofsd serves it.

    ``with PodShare(root) as root_dir:`` (or :meth:`open` / :meth:`close`). Open it *before*
    starting virtiofsd on ``root``; close it after virtiofsd stopped. Not thread-safe: call it from
    one thread (the event loop's).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._entries: dict[str, _Entry] = {}
        self._created_root = False
        self._mounted_root = False

    @property
    def container_ids(self) -> tuple[str, ...]:
        """Containers whose mounts are in the share."""
        return tuple(self._entries)

    def open(self) -> Path:
        """Create the root and make it a shared-propagation mount of itself."""
        if self._mounted_root:
            return self.root
        if not self.root.exists():
            self.root.mkdir(mode=0o700)
            self._created_root = True
        try:
            _mount(str(self.root), self.root, _MS_BIND)
            self._mounted_root = True
            # A peer group of its own: neither joins the parent's group nor receives its events.
            _mount("none", self.root, _MS_PRIVATE)
            _mount("none", self.root, _MS_SHARED)
        except BaseException:
            self.close()
            raise
        return self.root

    def add(self, spec: Spec, container_id: str) -> shared.SharePlan:
        """Bind the container's rootfs and bind-mount sources into ``<root>/<container_id>/``.

        Returns the plan; its ``guest_spec`` is the spec the guest must get. On failure nothing of
        the container is left in the share.
        """
        if container_id in self._entries:
            raise AlreadyExists("container already in the share", container=container_id)
        plan = shared.plan(spec, container_id, self.root)  # pure: raises before anything is made
        entry = _Entry()
        self._entries[container_id] = entry
        try:
            for bind in plan.binds:
                target = self.root / bind.target
                self._make(target, bind.is_dir, entry)
                attach_bind(bind.source, target, readonly=bind.readonly)
                entry.targets.append(target)
        except BaseException:
            self.remove(container_id)
            raise
        log.debug("container added to the share", container=container_id, binds=len(plan.binds))
        return plan

    def _make(self, path: Path, is_dir: bool, entry: _Entry) -> None:
        entry.created += shared.make_placeholder(path, is_dir, self.root)

    def remove(self, container_id: str) -> bool:
        """Unmount the container's binds and remove what was created for them.

        Returns False (and leaves the directories) if something is still mounted below the
        container's directory; unknown ids are a no-op (True).
        """
        entry = self._entries.pop(container_id, None)
        if entry is None:
            return True
        for target in reversed(entry.targets):
            detach(target)
        left = shared.mounts_below(self.root / container_id)
        if left:
            log.error("share still has mounts: left in place", container=container_id, mounts=",".join(left))
            return False
        for path in reversed(entry.created):
            try:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()  # never recursive: fails on anything not ours
                else:
                    path.unlink()
            except OSError as exc:
                log.warning("cannot remove from the share", path=str(path), error=exc.strerror)
        return True

    def close(self) -> None:
        """Remove every container, unmount the root, remove it if it was created here. Idempotent."""
        for cid in list(self._entries):
            self.remove(cid)
        if self._mounted_root:
            detach(self.root)
            self._mounted_root = False
        if self._created_root:
            left = shared.mounts_below(self.root)
            if left:
                log.error("share still has mounts: left in place", path=str(self.root), mounts=",".join(left))
                return
            try:
                self.root.rmdir()
                self._created_root = False
            except OSError as exc:
                log.warning("cannot remove the share", path=str(self.root), error=exc.strerror)

    @staticmethod
    def clean_stale(root: Path) -> bool:
        """Undo what a share whose owner died left at ``root``: unmount everything below it, then
        remove the layout (directories and empty placeholder files only). False if anything stays."""
        root = Path(root)
        if not root.exists():
            return True
        for point in sorted(shared.mounts_below(root), key=len, reverse=True):
            detach(Path(point))
        left = shared.mounts_below(root)
        if left:
            log.error("stale share still has mounts: left in place", path=str(root), mounts=",".join(left))
            return False
        ok = True
        for cdir in root.iterdir():
            mounts = cdir / "mounts"
            layout = [cdir / "rootfs", *(sorted(mounts.iterdir()) if mounts.is_dir() else []), mounts, cdir]
            for path in layout:
                ok = _remove_placeholder(path) and ok
        return _remove_placeholder(root) and ok

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _remove_placeholder(path: Path) -> bool:
    """rmdir an (empty) directory or unlink an empty file; anything else stays (and is reported)."""
    if not path.is_symlink() and not path.exists():
        return True
    try:
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            raise OSError(errno.EEXIST, "not a placeholder")
        if path.is_dir():
            path.rmdir()
        elif path.stat().st_size == 0:
            path.unlink()
        else:
            raise OSError(errno.ENOTEMPTY, "not an empty placeholder")
    except OSError as exc:
        log.warning("stale share: not removed", path=str(path), error=exc.strerror)
        return False
    return True
