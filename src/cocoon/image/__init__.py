"""The guest image: a kernel (vmlinux for microvm's PVH boot, bzImage for q35/pc) and an initrd
holding busybox, crun, a minimal Debian Python with protobuf, the kernel modules and the agent.

``find_image()`` returns the current build without hashing anything (cheap: used at every VM
start); ``build_image()`` / ``build_for_config()`` build or find in the cache. The builder is
imported on first use only. See docs/image.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cocoon.image.cache import DEFAULT_CACHE_DIR, Image, find_image, prune

if TYPE_CHECKING:
    from cocoon.image.builder import (
        Compression,
        ImageOptions,
        ProtobufImpl,
        build_for_config,
        build_image,
        options_from_config,
    )

_LAZY = frozenset({"Compression", "ImageOptions", "ProtobufImpl", "build_for_config", "build_image",
                   "options_from_config"})

__all__ = [
    "DEFAULT_CACHE_DIR",
    "Compression",
    "Image",
    "ImageOptions",
    "ProtobufImpl",
    "build_for_config",
    "build_image",
    "find_image",
    "options_from_config",
    "prune",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from cocoon.image import builder

        return getattr(builder, name)
    raise AttributeError(f"module 'cocoon.image' has no attribute {name!r}")
