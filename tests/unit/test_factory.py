"""VM templating without a VM: template shapes and keys, the clone's command line, the sparse
RAM copy, what cannot use a template, the agent's reseed request, and the virtio-fs tag wait."""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from pathlib import Path

import pytest

from cocoon import config
from cocoon.agent import mounts, snapshot
from cocoon.api import factory
from cocoon.errors import InvalidArgument
from cocoon.hypervisors.base import NetDevice, SharedDir, VMSpec
from cocoon.hypervisors.qemu import build_argv


@pytest.fixture
def spec(tmp_path: Path) -> VMSpec:
    for name in ("vmlinux", "initrd"):
        (tmp_path / name).write_bytes(b"x" * 10)
    return VMSpec(sandbox_id="sb1", workdir=tmp_path / "w", kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd")


def test_template_shape_drops_devices_and_adds_ports(spec, tmp_path):
    full = dataclasses.replace(spec, shared_dirs=(SharedDir("cocoon", tmp_path / "vfs.sock"),),
                               nics=(NetDevice("net0", 7, "02:00:00:00:00:01"),), hotplug_slots=2)  # fmt: skip
    t = factory.template_spec(full)
    assert t.shared_dirs == () and t.nics == () and t.shared_memory
    assert t.hotplug_slots == 2 + factory.EXTRA_SLOTS and t.sandbox_id == factory.TEMPLATE_SANDBOX
    # Sandboxes differing only in their devices, ids and workdirs share one template...
    assert factory.template_key(full) == factory.template_key(dataclasses.replace(spec, hotplug_slots=2,
                                                                                  sandbox_id="other"))  # fmt: skip
    # ...but not across guest sizes, accelerators or a rebuilt kernel.
    key = factory.template_key(spec)
    assert key != factory.template_key(dataclasses.replace(spec, memory_mib=512))
    assert key != factory.template_key(dataclasses.replace(spec, accel="kvm"))
    os.utime(spec.kernel, ns=(1, 1))
    assert key != factory.template_key(spec)


def test_what_cannot_use_a_template(spec, tmp_path):
    assert factory.unfit(spec) == ""
    assert "virtio-serial" in factory.unfit(dataclasses.replace(spec, channel="vsock"))
    many = tuple(NetDevice(f"net{i}", i, f"02:00:00:00:00:0{i}") for i in range(factory.EXTRA_SLOTS + 1))
    assert "shares and NICs" in factory.unfit(dataclasses.replace(spec, nics=many))
    assert "extra" in factory.unfit(dataclasses.replace(spec, extra_args=("-S",)))
    assert "not found" in factory.unfit(dataclasses.replace(spec, kernel=tmp_path / "none"))


def test_clone_command_line_restores_from_the_file(spec, tmp_path):
    argv = build_argv(dataclasses.replace(factory.template_spec(spec), memory_file=tmp_path / "ram",
                                          incoming=tmp_path / "state"))  # fmt: skip
    line = " ".join(argv)
    assert f"memory-backend-file,id=mem,size=256M,mem-path={tmp_path / 'ram'},share=on" in line
    assert "memory-backend-memfd" not in line and "memory-backend=mem" in line
    assert argv[-2:] == ["-incoming", "defer"]
    assert line.count("pcie-root-port") == factory.EXTRA_SLOTS and "pcie=on" in line
    assert "-incoming" not in build_argv(spec)


def test_copy_sparse_keeps_holes_and_data(tmp_path):
    src = tmp_path / "ram"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"a" * 4096)
        f.seek(40 << 20)
        f.write(b"b" * 8192)
    dst = tmp_path / "copy"
    factory.copy_sparse(src, dst)
    assert dst.stat().st_size == src.stat().st_size
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks * 512 < 4 << 20  # the holes stayed holes
    assert dst.stat().st_mode & 0o777 == 0o600  # guest memory
    with pytest.raises(FileExistsError):
        factory.copy_sparse(src, dst)  # never overwrites


def test_copy_sparse_of_an_all_hole_file(tmp_path):
    src = tmp_path / "empty"
    src.write_bytes(b"")
    os.truncate(src, 1 << 20)
    factory.copy_sparse(src, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == b"\0" * (1 << 20)


def test_templates_listed_and_destroyed(tmp_path):
    fc = config.FactoryConfig(template=True, template_dir=str(tmp_path / "t"))
    cfg = dataclasses.replace(config.Config(), factory=fc)
    assert factory.list_templates(cfg) == [] and factory.destroy_templates(cfg) == []
    (tmp_path / "t" / "k1").mkdir(parents=True)
    (tmp_path / "t" / "k1" / "meta.json").write_text('{"key": "k1"}')
    (tmp_path / "t" / "k1.lock").write_text("")
    (tmp_path / "t" / "k2.tmp99").mkdir()  # a build in progress (or a dead one): not listed
    assert factory.list_templates(cfg) == [{"key": "k1"}]
    assert factory.destroy_templates(cfg) == ["k1", "k2.tmp99"]
    assert list((tmp_path / "t").iterdir()) == []


def test_reseed_request_layout_and_bounds():
    req = snapshot.entropy_request(b"\x01" * 32)
    assert struct.unpack("ii", req[:8]) == (256, 32) and req[8:] == b"\x01" * 32
    with pytest.raises(InvalidArgument, match="seed size"):
        snapshot.reseed_random(b"short")


def test_virtiofs_mount_waits_for_a_hot_plugged_tag(monkeypatch):
    calls = []

    def fake_mount(source, target, fstype, flags, data):
        calls.append(source)
        if len(calls) < 3:
            raise OSError(errno.EINVAL, "Invalid argument", target)

    monkeypatch.setattr(mounts, "sys_mount", fake_mount)
    mounts._mount_virtiofs("cocoon", "/x", "virtiofs", 0, "")
    assert calls == ["cocoon"] * 3
    # Other errors, and a tag that never comes, fail.
    monkeypatch.setattr(mounts, "sys_mount", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no", "/x")))
    with pytest.raises(OSError):
        mounts._mount_virtiofs("cocoon", "/x", "virtiofs", 0, "")
    monkeypatch.setattr(mounts, "VIRTIOFS_TAG_WAIT", 0.05)
    monkeypatch.setattr(mounts, "sys_mount", lambda *a: (_ for _ in ()).throw(OSError(errno.EINVAL, "no", "/x")))
    with pytest.raises(OSError):
        mounts._mount_virtiofs("cocoon", "/x", "virtiofs", 0, "")


def test_prune_removes_stale_then_least_recently_used(tmp_path, monkeypatch):
    import json
    import time

    base = tmp_path / "t"
    cfg = dataclasses.replace(config.Config(), factory=config.FactoryConfig(template=True, template_dir=str(base)))
    kernel = tmp_path / "vmlinux"
    kernel.write_text("k")
    old = time.time() - 3600

    def make(key: str, used: float, kernel_path: Path = kernel) -> None:
        (base / key).mkdir(parents=True)
        (base / key / "meta.json").write_text(json.dumps({"kernel": str(kernel_path), "initrd": str(kernel)}))
        (base / f"{key}.lock").write_text("")
        os.utime(base / key / "meta.json", (used, used))

    make("gone", old, tmp_path / "no-such-kernel")  # its kernel was removed: unusable
    make("recent", time.time())  # in use: never pruned
    for i in range(3):
        make(f"lru{i}", old - i * 60)
    (base / "k9.tmp999999999").mkdir()  # a build whose process died
    (base / "clone-sb-x-999999999-5.ram").write_text("")  # a clone's copy whose process died
    (base / f"clone-sb-{os.getpid()}-5.ram").write_text("")  # ours: in use
    monkeypatch.setattr(factory, "MAX_TEMPLATES", 3)
    assert factory.prune(cfg, keep="recent") == ["gone", "lru2"]  # then within the limit (recent + lru0 + lru1)
    assert sorted(p.name for p in base.iterdir() if p.is_dir()) == ["lru0", "lru1", "recent"]
    assert [p.name for p in base.glob("clone-*")] == [f"clone-sb-{os.getpid()}-5.ram"]
    assert not (base / "gone.lock").exists()


def test_check_reports_templates_and_a_template_dir_off_tmpfs(tmp_path):
    from cocoon.check import Status, _is_tmpfs, check_factory

    off = check_factory(dataclasses.replace(config.Config(), factory=config.FactoryConfig(template=False)))
    assert off.status is Status.OK and off.detail.startswith("off")
    assert _is_tmpfs("/dev/shm/not/made/yet")
    if not _is_tmpfs(str(tmp_path)):
        disk = check_factory(dataclasses.replace(config.Config(), factory=config.FactoryConfig(
            template=True, template_dir=str(tmp_path / "t"))))  # fmt: skip
        assert disk.status is Status.WARN and "tmpfs" in disk.fix
    on = check_factory(dataclasses.replace(config.Config(), factory=config.FactoryConfig(
        template=True, template_dir=f"/dev/shm/cocoon-unit-{os.getpid()}")))  # fmt: skip
    assert on.status is Status.OK and on.detail.startswith("on, 0 saved")


def test_clone_of_a_broken_template_is_a_clear_error(spec, tmp_path):
    from cocoon.errors import HypervisorError

    cfg = dataclasses.replace(config.Config(), factory=config.FactoryConfig(template_dir=str(tmp_path / "t")))
    (tmp_path / "t" / "k").mkdir(parents=True)
    with pytest.raises(HypervisorError, match="template's RAM") as err:
        factory.clone(cfg, factory.Template(tmp_path / "t" / "k"), spec)
    assert "factory destroy" in err.value.context["hint"]
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["k"]  # no partial copy left


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path, monkeypatch):
    from cocoon.util.fs import write_atomic

    target = tmp_path / "meta.json"
    write_atomic(target, "one")
    write_atomic(target, b"two", mode=0o644)
    assert target.read_text() == "two" and os.listdir(tmp_path) == ["meta.json"]

    def fail(*args):
        raise OSError(errno.EIO, "disk gone")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        write_atomic(target, "three")
    assert target.read_text() == "two" and os.listdir(tmp_path) == ["meta.json"]
