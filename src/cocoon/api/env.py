"""What `cocoon env` shows: the effective configuration and what was detected on this host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cocoon.config import Config


def environment(cfg: Config) -> dict[str, Any]:
    """The effective configuration plus host facts (no VM is started)."""
    from cocoon import __version__
    from cocoon.check import qemu_binary
    from cocoon.hypervisors.accel import kvm_info
    from cocoon.hypervisors.arch import host_arch_name

    kvm = kvm_info()
    detected: dict[str, Any] = {
        "cocoon_version": __version__,
        "config_file": cfg.source or "(defaults: no configuration file)",
        "arch": host_arch_name(),
        "qemu": qemu_binary(cfg) or "(not found)",
        "kvm": {"present": kvm.present, "usable": kvm.usable, "flavor": kvm.flavor, "detail": kvm.detail},
        "agent_channel": "vsock" if Path("/dev/vhost-vsock").exists() else "virtio-serial",
        "tun": Path("/dev/net/tun").exists(),
    }
    try:
        from cocoon.image import find_image

        image = find_image(cfg)
        detected["image"] = {"kernel": str(image.kernel), "initrd": str(image.initrd), "hash": image.hash}
    except Exception as exc:  # a missing image is a fact to show, not a failure of `env`
        detected["image"] = f"(not built: {str(exc).splitlines()[0]})"
    return {"config": cfg.to_dict(), "detected": detected}
