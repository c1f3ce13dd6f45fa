"""The image cache on disk, readable without building anything (cheap: every VM start uses it).

Layout::

    <cache_dir>/<hash>/vmlinux        uncompressed ELF kernel, PVH boot (microvm)
    <cache_dir>/<hash>/bzImage        the distribution kernel as is (q35, pc; microvm fallback)
    <cache_dir>/<hash>/initrd         newc cpio, uncompressed or gzip
    <cache_dir>/<hash>/manifest.json  inputs, sizes, sha256s, every initrd entry
    <cache_dir>/current -> <hash>     the newest build (symlink, replaced atomically)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon.errors import ImageError

DEFAULT_CACHE_DIR = Path("/var/cache/cocoon/images")


@dataclass(frozen=True)
class Image:
    """A built image in the cache: paths to hand to QEMU plus its manifest."""

    key: str
    directory: Path
    bzimage: Path
    vmlinux: Path | None
    initrd: Path
    manifest: dict[str, Any] = field(repr=False)
    cached: bool = False

    @property
    def hash(self) -> str:
        """The content hash of the inputs (the cache key, also the directory name)."""
        return self.key

    @property
    def kernel(self) -> Path:
        """The fastest kernel to boot on microvm: vmlinux (PVH) when extracted, else the bzImage."""
        return self.vmlinux or self.bzimage

    def kernel_for(self, machine: str) -> Path:
        """The kernel file for a QEMU machine type: vmlinux (PVH) on microvm, the bzImage elsewhere."""
        return self.kernel if machine.split(",", 1)[0] == "microvm" else self.bzimage

    @property
    def initrd_size(self) -> int:
        """Size of the initrd file in bytes."""
        return int(self.manifest["initrd"]["size"])

    @property
    def size_bytes(self) -> int:
        """Size of the initrd file in bytes (what the guest loads besides the kernel)."""
        return self.initrd_size

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (paths, sizes, hash, whether it came from the cache)."""
        m = self.manifest
        return {
            "hash": self.key,
            "directory": str(self.directory),
            "kernel": str(self.kernel),
            "vmlinux": str(self.vmlinux) if self.vmlinux else None,
            "bzimage": str(self.bzimage),
            "initrd": str(self.initrd),
            "initrd_size": self.initrd_size,
            "initrd_compression": m["initrd"]["compression"],
            "kernel_release": m["kernel"]["release"],
            "cached": self.cached,
        }


def load(directory: Path, cached: bool) -> Image:
    manifest = json.loads((directory / "manifest.json").read_text())
    vmlinux = directory / "vmlinux"
    return Image(manifest["key"], directory, directory / "bzImage",
                 vmlinux if vmlinux.is_file() else None, directory / "initrd", manifest, cached)


def point_current(cache_dir: Path, key: str) -> None:
    tmp = cache_dir / f".current-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(key)
    os.replace(tmp, cache_dir / "current")


def cache_dir_of(where: object) -> Path:
    # A Config (its [image] cache_dir), an ImageConfig, or a path.
    image_cfg = getattr(where, "image", where)
    cache_dir = getattr(image_cfg, "cache_dir", where)
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise ImageError("not a cache directory or configuration", value=repr(where)[:80])
    return Path(cache_dir)


def find_image(where: object = DEFAULT_CACHE_DIR) -> Image:
    """The build ``current`` points at, without hashing anything.

    ``where`` is the cache directory, or a configuration whose ``[image] cache_dir`` names it.
    Raises ImageError (naming the command that fixes it) when nothing was built there.
    """
    current = cache_dir_of(where) / "current"
    try:
        return load(current.resolve(strict=True), cached=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ImageError("no guest image built: run `cocoon image build`", cache_dir=str(current.parent),
                         error=type(exc).__name__) from None


def prune(cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR, keep: int = 2) -> list[Path]:
    """Remove old builds, keeping ``current`` and the ``keep`` most recent others; returns removed."""
    cache = Path(cache_dir)
    try:
        keep_dir: Path | None = find_image(cache).directory
    except ImageError:
        keep_dir = None
    builds = sorted((p for p in cache.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
                     and p != keep_dir),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    removed = builds[keep:]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
