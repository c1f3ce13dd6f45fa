"""vmlinux extraction from a synthetic bzImage; PVH note detection; newest-kernel lookup."""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cocoon.errors import ImageError, NotFound
from cocoon.image import kernel as kern

PVH_ENTRY = 0x1000F00


def make_elf(pvh: int | None = PVH_ENTRY, filler: int = 4096) -> bytes:
    """A minimal x86-64 ELF with one PT_NOTE segment holding Xen notes (and PVH if given)."""
    notes = b""

    def note(name: bytes, ntype: int, desc: bytes) -> bytes:
        n = name + b"\0"
        return (struct.pack("<III", len(n), len(desc), ntype) + n + b"\0" * (-len(n) % 4)
                + desc + b"\0" * (-len(desc) % 4))

    notes += note(b"Xen", 6, b"linux\0")
    if pvh is not None:
        notes += note(b"Xen", kern.XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", pvh))
    notes += note(b"GNU", 3, b"\x01" * 20)
    ehdr_size, phdr_size = 64, 56
    note_off = ehdr_size + phdr_size
    ehdr = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
            + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, ehdr_size, 0, 0, ehdr_size,
                          phdr_size, 1, 64, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 4)
    return ehdr + phdr + notes + b"\xcc" * filler


def make_bzimage(payload_body: bytes, size: int, setup_sects: int = 3) -> bytes:
    """A fake bzImage: setup sectors with the boot header, then the 'protected mode' part."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    decompressor = b"\x90" * 300
    payload = payload_body + struct.pack("<I", size)
    struct.pack_into("<II", setup, 0x248, len(decompressor), len(payload))
    return bytes(setup) + decompressor + payload + b"\0" * 64


def test_pvh_entry() -> None:
    assert kern.pvh_entry(make_elf()) == PVH_ENTRY
    assert kern.pvh_entry(make_elf(pvh=None)) is None
    with pytest.raises(ImageError):
        kern.pvh_entry(b"MZ not an elf" + bytes(64))


@pytest.mark.parametrize(("name", "compress"), [("gzip", lambda b: gzip.compress(b, mtime=0)),
                                                ("xz", lzma.compress)])
def test_extract_stdlib_compressions(name: str, compress: Callable[[bytes], bytes]) -> None:
    elf = make_elf()
    bz = make_bzimage(compress(elf), len(elf))
    payload = kern.find_payload(bz)
    assert payload.compression == name
    assert kern.extract_vmlinux(bz) == elf


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 tool not installed")
def test_extract_lz4_legacy_frame_like_debian() -> None:
    elf = make_elf(filler=200_000)
    body = subprocess.run(["lz4", "-l", "-9", "-c"], input=elf, capture_output=True, check=True).stdout
    bz = make_bzimage(body, len(elf))
    assert kern.find_payload(bz).compression == "lz4"
    assert kern.extract_vmlinux(bz) == elf


def test_extract_refuses_without_pvh_and_bad_sizes() -> None:
    elf = make_elf(pvh=None)
    with pytest.raises(ImageError, match="PVH"):
        kern.extract_vmlinux(make_bzimage(gzip.compress(elf), len(elf)))
    good = make_elf()
    with pytest.raises(ImageError, match="size"):
        kern.extract_vmlinux(make_bzimage(gzip.compress(good), len(good) + 1))


def test_not_a_bzimage_and_unknown_compression() -> None:
    with pytest.raises(ImageError, match="HdrS"):
        kern.find_payload(bytes(4096))
    with pytest.raises(ImageError, match="compression"):
        kern.find_payload(make_bzimage(b"\x00\x11\x22\x33garbage", 10))


def test_find_kernel_newest_with_modules(tmp_path: Path) -> None:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for rel in ("6.1.0-9-cloud-amd64", "6.1.0-57-cloud-amd64", "6.10.0-1-cloud-amd64"):
        (boot / f"vmlinuz-{rel}").write_bytes(b"k")
    for rel in ("6.1.0-9-cloud-amd64", "6.1.0-57-cloud-amd64"):  # 6.10 has no modules
        (mods / rel).mkdir(parents=True)
        (mods / rel / "modules.dep").write_text("")
    k = kern.find_kernel(boot, modules_root=mods)
    assert k.release == "6.1.0-57-cloud-amd64" and k.modules_dir == mods / k.release
    with pytest.raises(NotFound):
        kern.find_kernel(boot, flavour="rt-amd64", modules_root=mods)


def test_real_debian_kernel_if_present() -> None:
    kernels = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"))
    if not kernels or shutil.which("lz4") is None:
        pytest.skip("no Debian cloud kernel or lz4 tool")
    data = kernels[-1].read_bytes()
    elf = kern.extract_vmlinux(data)
    assert elf[:4] == b"\x7fELF" and kern.pvh_entry(elf)
