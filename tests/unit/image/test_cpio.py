"""The newc writer: what it writes parses back (ours and the cpio tools agree), byte for byte stable."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest

from cocoon.errors import ImageError
from cocoon.image import cpio


def _sample(order: int = 1) -> cpio.Archive:
    a = cpio.Archive()
    items = [
        lambda: a.add_file("usr/bin/tool", b"\x7fELF" + b"x" * 13, 0o755),
        lambda: a.add_file("/etc/hostname", b"cocoon\n"),
        lambda: a.add_symlink("bin", "usr/bin"),
        lambda: a.add_device("dev/console", "c", 5, 1),
        lambda: a.add_dir("tmp", 0o1777),
        lambda: a.add_file("empty", b""),
    ]
    for add in items[::order]:
        add()
    return a


def test_round_trip_kinds_modes_and_data() -> None:
    entries = {e.path: e for e in cpio.read(_sample().to_bytes())}
    assert entries["usr/bin/tool"].data.startswith(b"\x7fELF")
    assert stat.S_IMODE(entries["usr/bin/tool"].mode) == 0o755
    assert entries["etc/hostname"].kind == "file"
    assert entries["bin"].kind == "symlink" and entries["bin"].target == "usr/bin"
    assert entries["dev/console"].kind == "chr" and entries["dev/console"].rdev == (5, 1)
    assert stat.S_IMODE(entries["tmp"].mode) == 0o1777
    assert entries["empty"].data == b""
    # Parents are created implicitly, as directories.
    assert entries["usr"].kind == "dir" and entries["usr/bin"].kind == "dir"


def test_parents_come_before_children_and_inodes_count_up() -> None:
    data = _sample().to_bytes()
    paths = [e.path for e in cpio.read(data)]
    for i, p in enumerate(paths):
        parent = p.rpartition("/")[0]
        if parent:
            assert parent in paths[:i]
    # inode field of member n is n (1-based), mtime/uid/gid are 0
    pos, n = 0, 0
    while data[pos:pos + 6] == cpio.MAGIC:
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        name_len, size = fields[11], fields[6]
        name = data[pos + 110: pos + 110 + name_len - 1].decode()
        if name == cpio.TRAILER:
            break
        n += 1
        assert fields[0] == n and fields[2] == fields[3] == fields[5] == 0
        pos += 110 + name_len
        pos += -pos % 4
        pos += size + (-size % 4)
    assert n == len(paths)


def test_deterministic_regardless_of_insertion_order() -> None:
    assert _sample(1).to_bytes() == _sample(-1).to_bytes()
    assert len(_sample().to_bytes()) % 4 == 0


def test_conflicting_additions_are_errors() -> None:
    a = cpio.Archive()
    a.add_file("x", b"1")
    a.add_file("x", b"1")  # same content: fine
    with pytest.raises(ImageError):
        a.add_file("x", b"2")
    a.add_file("x", b"2", replace=True)
    assert a.get("x") is not None and a.get("x").data == b"2"  # type: ignore[union-attr]
    with pytest.raises(ImageError):
        a.add_dir("x")
    with pytest.raises(ImageError):
        a.add_file("../etc/passwd", b"")
    with pytest.raises(ImageError):
        a.add_device("dev/x", "z", 1, 1)


def test_reader_rejects_garbage() -> None:
    with pytest.raises(ImageError):
        cpio.read(b"not a cpio archive at all, really" * 4)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_lists_what_we_wrote(tmp_path) -> None:
    proc = subprocess.run(["cpio", "-it", "--quiet"], input=_sample().to_bytes(), capture_output=True,
                          check=True)
    listed = set(proc.stdout.decode().split())
    assert {"usr/bin/tool", "etc/hostname", "bin", "dev/console", "tmp", "empty"} <= listed
