"""modules.dep parsing and load order; signature stripping; per-machine selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from cocoon.agent import kmod
from cocoon.errors import CocoonError

# An excerpt of Debian 6.1 cloud's modules.dep (dependency lists as the kernel writes them).
DEP = """\
kernel/fs/fuse/fuse.ko:
kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko \
kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
""".replace("\\\n", "")


def names(paths: list[str]) -> list[str]:
    return [kmod.module_name(p) for p in paths]


def test_module_name_normalises() -> None:
    assert kmod.module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert kmod.module_name("/x/y/9pnet_virtio.ko.xz") == "9pnet_virtio"


def test_parse() -> None:
    dep = kmod.parse_modules_dep(DEP)
    assert dep["virtiofs"][0] == "kernel/fs/fuse/virtiofs.ko"
    assert dep["virtio_net"][1][0] == "kernel/drivers/net/net_failover.ko"
    assert dep["overlay"][1] == []


def test_dependencies_first_each_once_in_request_order() -> None:
    dep = kmod.parse_modules_dep(DEP)
    r = kmod.resolve_order(dep, ["virtio_mmio", "virtio_net", "virtiofs", "overlay"])
    order = names(r.order)
    assert order == ["virtio_ring", "virtio", "virtio_mmio", "failover", "net_failover", "virtio_net",
                     "fuse", "virtiofs", "overlay"]
    assert r.missing == []
    # every module's dependencies precede it
    for name, (_, deps) in dep.items():
        if name in order:
            for d in deps:
                assert order.index(kmod.module_name(d)) < order.index(name)


def test_missing_optional_and_builtin() -> None:
    dep = kmod.parse_modules_dep(DEP)
    r = kmod.resolve_order(dep, ["overlay", "nope", "unix"], optional=["9pnet_virtio", "vsock"],
                           builtin=["kernel/net/unix/unix.ko"])
    assert r.missing == ["nope"]
    assert r.builtin == ["unix"]
    assert names(r.order) == ["overlay", "vsock"]


def test_cycle_is_an_error() -> None:
    dep = kmod.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(CocoonError, match="cycle"):
        kmod.resolve_order(dep, ["a"])


def test_list_round_trip() -> None:
    text = kmod.render_list(["/m/a.ko", "/m/b.ko"], header="kernel x\nin order")
    assert text.startswith("# kernel x\n# in order\n")
    assert kmod.read_list(text + "\n  # comment\n") == ["/m/a.ko", "/m/b.ko"]


def test_select_early_and_per_machine() -> None:
    dep = kmod.parse_modules_dep(DEP)
    every = kmod.resolve_order(dep, ["virtio_mmio", "virtio_pci", "virtio_console", "virtio_net",
                                     "vmw_vsock_virtio_transport", "overlay"]).order
    early = kmod.select(every, early=True)
    late = kmod.select(every, early=False)
    assert set(early) | set(late) == set(every) and not set(early) & set(late)
    assert "virtio_console" in names(early) and "virtio_net" in names(late)
    # late modules' dependencies are loaded early or earlier in the late list
    for i, path in enumerate(late):
        for d in dep[kmod.module_name(path)][1]:
            assert d in early or d in late[:i]
    microvm = names(kmod.select(every, has_pci=False))
    assert "virtio_pci" not in microvm and "virtio_pci_modern_dev" not in microvm
    assert "virtio_mmio" in microvm
    assert "virtio_mmio" not in names(kmod.select(every, has_mmio=False))


def _signed(body: bytes, sig: bytes) -> bytes:
    info = bytes(8) + len(sig).to_bytes(4, "big")  # struct module_signature, sig_len last
    return body + sig + info + kmod.SIG_MAGIC


def test_strip_signature_synthetic() -> None:
    body = b"\x7fELF module body"
    assert kmod.strip_signature(_signed(body, b"S" * 100)) == body
    assert kmod.strip_signature(body) == body
    with pytest.raises(CocoonError):
        kmod.strip_signature(_signed(b"", b"S" * 10)[5:])


def test_strip_signature_real_module() -> None:
    mods = sorted(Path("/lib/modules").glob("*/kernel/fs/overlayfs/overlay.ko"))
    if not mods:
        pytest.skip("no overlay.ko on this host")
    data = mods[-1].read_bytes()
    stripped = kmod.strip_signature(data)
    assert stripped[:4] == b"\x7fELF" and len(stripped) < len(data)
    assert not stripped.endswith(kmod.SIG_MAGIC)
