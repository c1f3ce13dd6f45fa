"""Pieces of the guest-python step: ldd parsing, deterministic zips and pycs."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from cocoon.errors import ImageError
from cocoon.image import layout, pyclosure

LDD = """\
\tlinux-vdso.so.1 (0x00007ffd)
\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f52)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f52)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f52)
"""


def test_parse_ldd() -> None:
    assert pyclosure.parse_ldd(LDD) == ["/lib/x86_64-linux-gnu/libm.so.6", "/lib/x86_64-linux-gnu/libc.so.6",
                                        "/lib64/ld-linux-x86-64.so.2"]
    with pytest.raises(ImageError, match="not found"):
        pyclosure.parse_ldd("\tlibfoo.so.1 => not found\n")


def test_guest_paths_are_merged_usr() -> None:
    assert layout.guest_path("/lib/x86_64-linux-gnu/libc.so.6") == "usr/lib/x86_64-linux-gnu/libc.so.6"
    assert layout.guest_path("/lib64/ld-linux-x86-64.so.2") == "usr/lib64/ld-linux-x86-64.so.2"
    assert layout.guest_path("/usr/bin/crun") == "usr/bin/crun"
    assert layout.guest_path("/bin/busybox") == "usr/bin/busybox"


def test_pyc_name() -> None:
    assert pyclosure.pyc_name("json", Path("/x/json/__init__.py")) == "json/__init__.pyc"
    assert pyclosure.pyc_name("json.decoder", Path("/x/json/decoder.py")) == "json/decoder.pyc"


def test_zip_is_deterministic_and_stored() -> None:
    a = pyclosure.write_zip([("b.pyc", b"2"), ("a/__init__.pyc", b"1")])
    b = pyclosure.write_zip([("a/__init__.pyc", b"1"), ("b.pyc", b"2")])
    assert a == b
    z = zipfile.ZipFile(io.BytesIO(a))
    assert z.namelist() == ["a/__init__.pyc", "b.pyc"]
    assert all(i.compress_type == zipfile.ZIP_STORED and i.date_time == (1980, 1, 1, 0, 0, 0)
               for i in z.infolist())


GUEST_PYTHON = Path("/usr/bin/python3.11")
needs_python = pytest.mark.skipif(not GUEST_PYTHON.exists(), reason="Debian python3.11 not installed")


@needs_python
def test_compile_is_deterministic_and_unchecked(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("X = {'a', 'b', 'c', 'd'}\ndef f():\n    'doc'\n    return X\n")
    one = pyclosure.compile_sources(GUEST_PYTHON, [(src, "/usr/lib/cocoon/m.py")])
    two = pyclosure.compile_sources(GUEST_PYTHON, [(src, "/usr/lib/cocoon/m.py")])
    assert one == two
    flags = int.from_bytes(one[0][4:8], "little")
    assert flags == 0b01  # hash-based, unchecked


@needs_python
def test_import_closure_finds_stdlib_and_honours_exclusions(tmp_path: Path) -> None:
    (tmp_path / "entry.py").write_text("import json, hashlib\ntry:\n    import ssl\nexcept ImportError:\n    pass\n")
    c = pyclosure.import_closure(GUEST_PYTHON, [tmp_path], ["entry"], ["does_not_exist_xyz"])
    assert "json" in c.sources and "json.decoder" in c.sources
    assert "ssl" not in c.sources and "_ssl" not in c.extensions and "_hashlib" not in c.extensions
    assert c.failed == {}
    assert c.others["entry"] == str(tmp_path / "entry.py")
    bad = pyclosure.import_closure(GUEST_PYTHON, [tmp_path], ["does_not_exist_xyz"])
    assert "does_not_exist_xyz" in bad.failed
