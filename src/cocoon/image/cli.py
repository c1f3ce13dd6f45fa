"""``cocoon image build|show|prune``: argument parsing only, the work is in :mod:`cocoon.image.builder`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cocoon.errors import CocoonError
from cocoon.image.builder import Compression, ImageOptions, ProtobufImpl, build_image
from cocoon.image.cache import DEFAULT_CACHE_DIR, Image, find_image, prune


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cocoon image", description="Build and inspect the guest image.")
    p.add_argument("command", nargs="?", default="build", choices=("build", "show", "prune"))
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--force", action="store_true", help="rebuild even if the cache has this image")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--kernel", type=Path, help="bzImage to use (default: newest /boot/vmlinuz-*-cloud-amd64)")
    p.add_argument("--modules-dir", type=Path, help="modules tree (default: /lib/modules/<release>)")
    p.add_argument("--compression", choices=[c.value for c in Compression], default=Compression.NONE.value)
    p.add_argument("--protobuf-impl", choices=[c.value for c in ProtobufImpl], default=ProtobufImpl.UPB.value)
    p.add_argument("--no-vmlinux", action="store_true", help="do not extract vmlinux (bzImage only)")
    p.add_argument("--keep", type=int, default=2, help="prune: builds to keep besides current")
    return p


def _print(image: Image, as_json: bool) -> None:
    s = image.to_dict()
    if as_json:
        print(json.dumps(s, indent=1))
        return
    state = "cached" if image.cached else "built"
    print(f"{state} {s['hash']}")
    print(f"  kernel  {s['kernel']} ({s['kernel_release']})")
    print(f"  initrd  {s['initrd']} ({image.initrd_size / 1e6:.2f} MB, {s['initrd_compression']})")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "show":
            _print(find_image(args.cache_dir), args.json)
            return 0
        if args.command == "prune":
            removed = prune(args.cache_dir, keep=args.keep)
            print(json.dumps([str(p) for p in removed]) if args.json else f"removed {len(removed)} builds")
            return 0
        opts = ImageOptions(kernel=args.kernel, modules_dir=args.modules_dir,
                            compression=Compression(args.compression),
                            protobuf_impl=ProtobufImpl(args.protobuf_impl),
                            extract_vmlinux=not args.no_vmlinux)
        _print(build_image(opts, cache_dir=args.cache_dir, force=args.force), args.json)
        return 0
    except CocoonError as exc:
        print(f"cocoon image: {exc}", file=sys.stderr)
        return 1
