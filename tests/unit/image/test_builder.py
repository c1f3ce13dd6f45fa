"""The builder's cache: same inputs -> same key and bytes, any input change -> a new build."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

import cocoon
from cocoon.agent import kmod
from cocoon.errors import ImageError
from cocoon.image import Compression, Image, ImageOptions, build_image, cpio, find_image, prune
from cocoon.image.builder import options_from_config

from .test_kernel import make_bzimage, make_elf

BUSYBOX, PYTHON = Path("/bin/busybox"), Path("/usr/bin/python3.11")
pytestmark = pytest.mark.skipif(not (BUSYBOX.exists() and PYTHON.exists()),
                                reason="needs busybox-static and Debian python3.11")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> ImageOptions:
    tmp_path = tmp_path_factory.mktemp("inputs")
    release = "6.1.0-99-test-amd64"
    elf = make_elf()
    kernel = tmp_path / f"vmlinuz-{release}"
    kernel.write_bytes(make_bzimage(gzip.compress(elf, mtime=0), len(elf)))
    mods = tmp_path / "modules" / release
    for rel in ("kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/char/virtio_console.ko", "kernel/fs/overlayfs/overlay.ko"):
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / rel).write_bytes(b"\x7fELF " + rel.encode())
    (mods / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/fs/overlayfs/overlay.ko:\n")
    # A snapshot of the guest-side sources: the live tree may change while the tests run.
    src = tmp_path / "src" / "cocoon"
    shutil.copytree(Path(cocoon.__file__).parent, src, ignore=shutil.ignore_patterns("__pycache__"))
    return ImageOptions(kernel=kernel, modules_dir=mods, busybox=BUSYBOX, python=PYTHON, crun=None, cocoon_src=src,
                        modules=("virtio_console", "overlay"), optional_modules=("9pnet_virtio",))


@pytest.fixture(scope="module")
def built(inputs: ImageOptions, tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build_image(inputs, cache_dir=tmp_path_factory.mktemp("cache"))


def _initrd_entries(image_initrd: Path) -> dict[str, cpio.Entry]:
    return {e.path: e for e in cpio.read(image_initrd.read_bytes())}


def test_build_layout_and_manifest(built: Image) -> None:
    img = built
    assert not img.cached and img.directory.name == img.key
    assert img.vmlinux is not None and img.vmlinux.read_bytes() == make_elf()
    assert img.kernel_for("microvm") == img.vmlinux and img.kernel_for("q35") == img.bzimage
    ents = _initrd_entries(img.initrd)
    assert ents["dev/console"].rdev == (5, 1) and ents["dev/null"].rdev == (1, 3)
    assert ents["init"].data.startswith(b"#!/usr/bin/python3.11")
    assert b"COCOON-BARE-READY" in ents["usr/sbin/bare-init"].data
    assert ents["bin"].target == "usr/bin"
    listed = kmod.read_list(ents["etc/cocoon/modules"].data.decode())
    assert [kmod.module_name(p) for p in listed] == ["virtio_ring", "virtio", "virtio_console", "overlay"]
    for p in listed:
        assert p.lstrip("/") in ents
    assert "usr/lib/python311.zip" in ents and "usr/lib/cocoon/cocoon/agent/init.pyc" in ents
    assert "usr/lib/cocoon/cocoon/cli/__init__.pyc" not in ents  # host-only code stays out
    m = json.loads((img.directory / "manifest.json").read_text())
    assert m["initrd"]["size"] == img.initrd.stat().st_size == img.size_bytes
    assert m["key"] == img.hash
    assert any(c["path"] == "/usr/bin/python3.11" for c in m["contents"])
    assert find_image(img.directory.parent).key == img.key


def test_cache_hit_then_miss_on_input_change(inputs: ImageOptions, built: Image, tmp_path: Path) -> None:
    again = build_image(inputs, cache_dir=built.directory.parent)
    assert again.cached and again.key == built.key
    cache = tmp_path / "cache"
    first = build_image(inputs, cache_dir=cache)
    assert first.key == built.key and not first.cached
    # a kernel module changes -> new key, new build, `current` moves
    ko = inputs.modules_dir / "kernel/fs/overlayfs/overlay.ko"  # type: ignore[operator]
    original = ko.read_bytes()
    ko.write_bytes(original + b"v2")
    try:
        changed = build_image(inputs, cache_dir=cache)
    finally:
        ko.write_bytes(original)
    assert not changed.cached and changed.key != first.key
    assert os.readlink(cache / "current") == changed.key
    # an option changes -> new key as well
    gz = build_image(ImageOptions(**{**inputs.__dict__, "compression": Compression.GZIP}), cache_dir=cache)
    assert gz.key != changed.key and gz.initrd.read_bytes()[:2] == b"\x1f\x8b"
    assert cpio.read(gzip.decompress(gz.initrd.read_bytes()))
    # no temp dirs left, prune keeps current
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    removed = prune(cache, keep=1)
    assert len(removed) == 1 and find_image(cache).key == gz.key


def test_same_inputs_same_bytes_and_force(inputs: ImageOptions, built: Image, tmp_path: Path) -> None:
    b = build_image(inputs, cache_dir=tmp_path, force=True)
    assert not b.cached and b.key == built.key
    assert built.initrd.read_bytes() == b.initrd.read_bytes()
    assert (built.directory / "manifest.json").read_bytes() == (b.directory / "manifest.json").read_bytes()


def test_find_image_without_build_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cocoon image build"):
        find_image(tmp_path)


def test_options_from_config_duck_typed(tmp_path: Path) -> None:
    class ImageCfg:
        cache_dir = str(tmp_path)
        kernel = ""
        compression = "gzip"

    class Cfg:
        image = ImageCfg()

    opts, cache = options_from_config(Cfg())
    assert cache == tmp_path and opts.kernel is None and opts.compression is Compression.GZIP
