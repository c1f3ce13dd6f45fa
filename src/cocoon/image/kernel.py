"""The guest kernel: find the newest host kernel, extract its uncompressed vmlinux, check PVH.

QEMU's ``-M microvm`` boots an ELF vmlinux through its PVH entry point (Xen ELF note 18,
``XEN_ELFNOTE_PHYS32_ENTRY``) without running the bzImage's decompressor, which under TCG is
the slowest part of early boot. A bzImage carries vmlinux as one compressed payload whose offset
and length the boot header gives (``payload_offset``/``payload_length`` at 0x248, boot protocol
>= 2.08); the build appends the decompressed size as 4 little-endian bytes.

Debian's cloud kernel uses LZ4 (legacy frame), which the standard library cannot decode: the
``lz4`` (or ``zstd``) program from Debian does it. Without that tool, :func:`extract_vmlinux`
raises and the builder falls back to the bzImage.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from cocoon.errors import ImageError, NotFound
from cocoon.util.proc import run

XEN_ELFNOTE_PHYS32_ENTRY = 18

# Magic numbers of the compressions a bzImage payload can use.
_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b"),
    ("xz", b"\xfd7zXZ\x00"),
    ("lzma", b"\x5d\x00\x00"),
    ("bzip2", b"BZh"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lzo", b"\x89LZO"),
    ("elf", b"\x7fELF"),
)


@dataclass(frozen=True)
class KernelInfo:
    """A host kernel: its bzImage, release string and modules directory."""

    bzimage: Path
    release: str
    modules_dir: Path


def _release_key(release: str) -> tuple[tuple[int, str], ...]:
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", release))


def find_kernel(boot_dir: str | os.PathLike[str] = "/boot", flavour: str = "cloud-amd64",
                modules_root: str | os.PathLike[str] = "/lib/modules") -> KernelInfo:
    """The newest ``vmlinuz-*-<flavour>`` in ``boot_dir`` whose modules are installed."""
    boot = Path(boot_dir)
    candidates = []
    for path in boot.glob(f"vmlinuz-*-{flavour}"):
        release = path.name.removeprefix("vmlinuz-")
        mods = Path(modules_root) / release
        if (mods / "modules.dep").is_file():
            candidates.append((_release_key(release), release, path, mods))
    if not candidates:
        raise NotFound("no guest kernel with modules found", boot_dir=str(boot), flavour=flavour,
                       modules_root=str(modules_root))
    _, release, path, mods = max(candidates)
    return KernelInfo(path, release, mods)


@dataclass(frozen=True)
class Payload:
    """Where the compressed vmlinux sits inside a bzImage and how it is compressed."""

    offset: int
    length: int
    compression: str


def find_payload(image: bytes) -> Payload:
    """Locate the compressed vmlinux in a bzImage using its boot protocol header."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise ImageError("not a bzImage (no HdrS boot header)")
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        raise ImageError("bzImage boot protocol too old for payload fields", version=hex(version))
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if start + length > len(image) or length < 8:
        raise ImageError("bzImage payload out of range", offset=start, length=length)
    head = image[start:start + 8]
    for name, magic in _MAGICS:
        if head.startswith(magic):
            return Payload(start, length, name)
    raise ImageError("unknown bzImage payload compression", magic=head.hex())


def _decompress_tool(tool: str, args: list[str], data: bytes) -> bytes:
    exe = shutil.which(tool, path="/usr/bin:/bin:/usr/local/bin")
    if exe is None:
        raise NotFound(f"{tool} is needed to decompress the kernel", command=tool)
    return run([exe, *args], input=data, timeout=120).stdout


def decompress_payload(payload: bytes, compression: str) -> bytes:
    """Decompress a bzImage payload; stdlib for gzip/xz/lzma/bzip2, the lz4/zstd tools otherwise."""
    # Every payload ends with the 4-byte decompressed size appended by the kernel build.
    body = payload[:-4]
    (size,) = struct.unpack("<I", payload[-4:])
    # Imported here: finding an image (every VM start) must not pay for the decompressors.
    if compression == "gzip":
        import gzip

        out = gzip.decompress(body)
    elif compression in ("xz", "lzma"):
        import lzma

        out = lzma.decompress(body)
    elif compression == "bzip2":
        import bz2

        out = bz2.decompress(body)
    elif compression == "lz4":
        out = _decompress_tool("lz4", ["-dc"], body)
    elif compression == "zstd":
        out = _decompress_tool("zstd", ["-dcq"], body)
    elif compression == "elf":
        out = payload
    else:
        raise ImageError("cannot decompress kernel payload", compression=compression)
    if compression != "elf" and len(out) != size:
        raise ImageError("kernel payload size mismatch", expected=size, got=len(out))
    return out


def pvh_entry(elf: bytes) -> int | None:
    """The PVH entry address from an x86-64 ELF's notes, or None if it has none."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ImageError("vmlinux is not a 64-bit little-endian ELF")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        p_type, = struct.unpack_from("<I", elf, base)
        if p_type != 4:  # PT_NOTE
            continue
        off, = struct.unpack_from("<Q", elf, base + 8)
        size, = struct.unpack_from("<Q", elf, base + 32)
        pos, end = off, off + size
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            desc_at = pos + 12 + ((namesz + 3) & ~3)
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                fmt = "<I" if descsz == 4 else "<Q"
                return int(struct.unpack_from(fmt, elf, desc_at)[0])
            pos = desc_at + ((descsz + 3) & ~3)
    return None


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF vmlinux inside ``bzimage``; raises ImageError if it has no PVH note."""
    payload = find_payload(bzimage)
    elf = decompress_payload(bzimage[payload.offset:payload.offset + payload.length],
                             payload.compression)
    if pvh_entry(elf) is None:
        raise ImageError("vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
    return elf
