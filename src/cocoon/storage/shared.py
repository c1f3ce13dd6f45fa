"""The directory a sandbox shares with its VM, and the container spec as the guest must see it.

One virtio-fs share per sandbox (tag ``cocoon``, mounted at ``/run/cocoon/shared`` in the
guest) carries everything of the host a container needs: its rootfs and the sources
of its bind mounts, bind-mounted under ``<share>/<container id>/``. :func:`plan` is pure
(the spec rewrite, unit-tested); :class:`cocoon.api.pod_share.PodShare` makes the bind mounts
(also while virtiofsd serves the share) and always undoes them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocoon.errors import InvalidArgument, NotFound
from cocoon.log import get_logger
from cocoon.oci.model import Spec
from cocoon.util.proc import run

log = get_logger("storage")

SHARE_TAG = "cocoon"
GUEST_SHARED = "/run/cocoon/shared"

# Mount types the guest makes itself; everything else must be a bind mount of a host path.
GUEST_FILESYSTEMS = frozenset(
    {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "shm", "ramfs", "bpf", "securityfs"}
)


@dataclass(frozen=True)
class Bind:
    """One host path bind-mounted into the share."""

    source: Path  # on the host
    target: str  # relative to the share's root
    is_dir: bool
    readonly: bool


@dataclass(frozen=True)
class SharePlan:
    host_dir: Path
    binds: tuple[Bind, ...]
    guest_spec: dict[str, Any]


def _is_bind(mount: dict[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") in ("bind", "rbind") or "bind" in options or "rbind" in options


def plan(spec: Spec, container_id: str, share_root: Path) -> SharePlan:
    """Work out the bind mounts and the guest's copy of the spec (no side effects)."""
    sub = container_id
    host_dir = share_root
    guest_base = f"{GUEST_SHARED}/{sub}"
    raw = copy.deepcopy(dict(spec.raw))
    binds: list[Bind] = [Bind(spec.root.path, f"{sub}/rootfs", True, False)]
    if not spec.root.path.is_dir():
        raise NotFound("container rootfs not found", path=str(spec.root.path), field="root.path")
    raw["root"] = {"path": f"{guest_base}/rootfs", "readonly": spec.root.readonly}

    mounts_out: list[dict[str, Any]] = []
    for i, mount in enumerate(raw.get("mounts") or []):
        if not isinstance(mount, dict):
            raise InvalidArgument("mount must be an object", field=f"mounts[{i}]")
        mtype = mount.get("type", "")
        if not _is_bind(mount):
            if mtype and mtype not in GUEST_FILESYSTEMS:
                log.warning("mount type not supported in the VM: skipped", destination=mount.get("destination"),
                            type=mtype)  # fmt: skip
                continue
            mounts_out.append(mount)
            continue
        source = Path(mount.get("source", ""))
        if not source.is_absolute():
            source = spec.bundle / source
        if not source.exists():
            raise NotFound("bind mount source not found", path=str(source), field=f"mounts[{i}].source")
        options = [o for o in mount.get("options") or [] if o not in ("rbind", "bind")]
        readonly = "ro" in options
        target = f"{sub}/mounts/{i}"
        binds.append(Bind(source, target, source.is_dir(), readonly))
        mounts_out.append(
            {**mount, "type": "bind", "source": f"{GUEST_SHARED}/{target}", "options": ["rbind", *options]}
        )
    raw["mounts"] = mounts_out
    # Host hooks run on the host, by us; startContainer runs in the container's namespaces (its path
    # resolves in the container's rootfs), which are in the guest: crun runs it there.
    start = (raw.pop("hooks", None) or {}).get("startContainer")
    if start:
        raw["hooks"] = {"startContainer": start}
    return SharePlan(host_dir, tuple(binds), raw)


def make_placeholder(path: Path, is_dir: bool, root: Path) -> list[Path]:
    """Create ``path`` (a directory, or an empty file to bind a file on) and its missing parents up to
    ``root``; returns what was created, outermost first, so that exactly that can be removed later."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p == root:
            break
        p = p.parent
    created = []
    for q in reversed(missing):
        if q == path and not is_dir:
            q.touch(mode=0o600)
        else:
            q.mkdir(mode=0o700)
        created.append(q)
    return created


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo)."""
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(prefix):
                found.append(point)
    return found


def unmount_all_below(path: str | Path) -> None:
    """Lazily unmount whatever is still mounted below ``path`` (deepest first)."""
    for point in sorted(mounts_below(Path(path)), key=len, reverse=True):
        run(["umount", "-l", point], check=False)
