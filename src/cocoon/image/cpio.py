"""A deterministic writer (and a reader, for tests and inspection) of "newc" cpio archives.

The Linux initramfs format is the SVR4 "newc" cpio (magic ``070701``): a 110-byte ASCII
header, the NUL-terminated name padded to 4 bytes, the data padded to 4 bytes, and a
``TRAILER!!!`` entry at the end. The kernel's unpacker creates entries in archive order and
does not create missing parents, so :class:`Archive` adds parent directories itself and writes
entries sorted by path components (a parent always precedes its children).

Everything that could make two builds differ is fixed: mtime 0, uid/gid 0, inode numbers
assigned 1, 2, 3, ... in output order, one link per entry.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass

from cocoon.errors import ImageError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER_LEN = 110


@dataclass(frozen=True)
class Entry:
    """One archive member. ``mode`` includes the file type bits (``stat.S_IFREG | 0o644``)."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @property
    def kind(self) -> str:
        """``file``, ``dir``, ``symlink``, ``chr``, ``blk`` or ``other``."""
        fmt = stat.S_IFMT(self.mode)
        return {
            stat.S_IFREG: "file",
            stat.S_IFDIR: "dir",
            stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "chr",
            stat.S_IFBLK: "blk",
        }.get(fmt, "other")

    @property
    def target(self) -> str:
        """The target of a symlink."""
        return self.data.decode()


def _norm(path: str) -> str:
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ImageError("bad path for initrd entry", path=path)
    return "/".join(parts)


def _sort_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


class Archive:
    """An in-memory set of entries keyed by path; :meth:`to_bytes` renders the newc stream."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __contains__(self, path: str) -> bool:
        return _norm(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, path: str) -> Entry | None:
        """The entry at ``path`` or None."""
        return self._entries.get(_norm(path))

    def entries(self) -> list[Entry]:
        """All entries in output order."""
        return [self._entries[p] for p in sorted(self._entries, key=_sort_key)]

    def _put(self, entry: Entry, *, replace: bool) -> None:
        parent = entry.path.rpartition("/")[0]
        if parent:
            self.add_dir(parent)
        old = self._entries.get(entry.path)
        if old is not None and not replace:
            if old == entry:
                return
            raise ImageError("initrd path added twice with different content", path=entry.path)
        self._entries[entry.path] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        """Add a directory (and its parents); re-adding an existing directory is a no-op."""
        path = _norm(path)
        old = self._entries.get(path)
        if old is not None:
            if old.kind != "dir":
                raise ImageError("initrd path is not a directory", path=path, kind=old.kind)
            return
        self._put(Entry(path, stat.S_IFDIR | (mode & 0o7777)), replace=False)

    def add_file(self, path: str, data: bytes, mode: int = 0o644, *, replace: bool = False) -> None:
        """Add a regular file; adding the same path with other content raises unless ``replace``."""
        self._put(Entry(_norm(path), stat.S_IFREG | (mode & 0o7777), bytes(data)), replace=replace)

    def add_symlink(self, path: str, target: str) -> None:
        """Add a symbolic link ``path -> target``."""
        self._put(Entry(_norm(path), stat.S_IFLNK | 0o777, target.encode()), replace=False)

    def add_device(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a device node; ``kind`` is ``c`` (character) or ``b`` (block)."""
        fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}.get(kind)
        if fmt is None:
            raise ImageError("bad device kind", path=path, kind=kind)
        self._put(Entry(_norm(path), fmt | (mode & 0o7777), rdev=(major, minor)), replace=False)

    def iter_chunks(self) -> Iterator[bytes]:
        """Yield the archive as byte chunks (headers and data, padded, then the trailer)."""
        for ino, entry in enumerate(self.entries(), start=1):
            yield from _member(entry, ino)
        yield from _member(Entry(TRAILER, 0), 0)

    def to_bytes(self) -> bytes:
        """The whole newc archive."""
        return b"".join(self.iter_chunks())

    def data_size(self) -> int:
        """Sum of the payload sizes of all entries (for reporting)."""
        return sum(len(e.data) for e in self._entries.values())


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _member(entry: Entry, ino: int) -> Iterator[bytes]:
    name = entry.path.encode() + b"\0"
    nlink = 2 if entry.kind == "dir" else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, entry.rdev[0], entry.rdev[1],
              len(name), 0)
    header = MAGIC + b"".join(b"%08X" % f for f in fields)
    yield header + name + _pad(_HEADER_LEN + len(name))
    if entry.data:
        yield entry.data + _pad(len(entry.data))


def read(data: bytes) -> list[Entry]:
    """Parse a newc archive (as written by :class:`Archive`) back into entries, trailer excluded."""
    out: list[Entry] = []
    pos = 0
    while True:
        if data[pos:pos + 6] != MAGIC:
            raise ImageError("not a newc cpio member", offset=pos)
        try:
            fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise ImageError("bad cpio header", offset=pos) from exc
        mode, filesize, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = pos + _HEADER_LEN
        name = data[name_start:name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        if name == TRAILER:
            return out
        payload = data[pos:pos + filesize]
        if len(payload) != filesize:
            raise ImageError("truncated cpio member", path=name)
        pos += filesize
        pos += -pos % 4
        out.append(Entry(name, mode, payload, (rmaj, rmin)))
