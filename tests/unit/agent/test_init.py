"""The guest's early init, pure parts: command line, mount table, modules, cgroups (no root, no VM)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cocoon.agent import init, kmod
from cocoon.errors import CocoonError


def test_parse_cmdline_kernel_rules() -> None:
    text = ('console=ttyS0 quiet cocoon.hostname=pod-1 msg="two words" a=1 a=2 '
            'init_flag dquote="x=y" -- cocoon.hostname=ignored\n')
    p = init.parse_cmdline(text)
    assert p["console"] == "ttyS0"
    assert p["quiet"] == "" and p["init_flag"] == ""
    assert p["cocoon.hostname"] == "pod-1"
    assert p["msg"] == "two words"
    assert p["a"] == "2"
    assert p["dquote"] == "x=y"
    assert init.parse_cmdline("") == {}
    assert init.parse_cmdline('  x=""  ') == {"x": ""}


def test_read_cmdline_missing_is_empty(tmp_path: Path) -> None:
    assert init.read_cmdline(str(tmp_path / "nope")) == {}
    (tmp_path / "c").write_text("a=b\n")
    assert init.read_cmdline(str(tmp_path / "c")) == {"a": "b"}


@pytest.mark.parametrize(("name", "ok"), [("cocoon", True), ("pod-1.example", True), ("a" * 64, True),
                                          ("a" * 65, False), ("-bad", False), ("bad-", False),
                                          ("", False), ("has space", False), ("ünï", False),
                                          ("a..b", False)])
def test_valid_hostname(name: str, ok: bool) -> None:
    assert init.valid_hostname(name) is ok


def test_mount_table_order_and_flags() -> None:
    targets = [m.target for m in init.MOUNTS]
    assert targets[:3] == ["/proc", "/sys", "/dev"]
    assert len(set(targets)) == len(targets)
    for i, m in enumerate(init.MOUNTS):
        # each mount point lives on an earlier mount (or the initramfs root)
        parents = [t for t in targets[:i] if m.target.startswith(t + "/")]
        top = m.target.split("/")[1]
        assert parents or top in ("proc", "sys", "dev", "run", "tmp")
        assert m.flags & init.MS_NOSUID
    cg = next(m for m in init.MOUNTS if m.fstype == "cgroup2")
    assert cg.target == "/sys/fs/cgroup" and targets.index("/sys") < targets.index(cg.target)
    assert next(m for m in init.MOUNTS if m.target == "/tmp").mode == 0o1777


def test_mount_all_is_idempotent_with_fake_syscalls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mounted: set[str] = set()
    calls: list[tuple[object, ...]] = []

    def fake_call(name: str, *args: object) -> None:
        calls.append((name, *args))
        mounted.add(os.fsdecode(args[1]))  # type: ignore[arg-type]

    monkeypatch.setattr(init._Libc, "call", staticmethod(fake_call))
    monkeypatch.setattr(init.os.path, "ismount", lambda p: p in mounted)
    table = tuple(init.Mount(m.source, str(tmp_path) + m.target, m.fstype, m.flags, m.data, m.mode)
                  for m in init.MOUNTS)
    links = ((str(tmp_path / "dev/fd"), "/proc/self/fd"),)
    first = init.mount_all(table, links)
    assert first == [m.target for m in table]
    assert calls[0][:4] == ("mount", b"proc", str(tmp_path / "proc").encode(), b"proc")
    assert (tmp_path / "dev/fd").is_symlink()
    assert init.mount_all(table, links) == []  # second run: nothing to do
    assert len(calls) == len(table)


def test_enabled_controllers() -> None:
    assert init.enabled_controllers("cpuset cpu io memory hugetlb pids rdma misc") == [
        "cpuset", "cpu", "io", "memory", "pids"]
    assert init.enabled_controllers("memory pids") == ["memory", "pids"]
    assert init.enabled_controllers("") == []


def test_enable_cgroup_controllers_writes_only_missing(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("memory\n")
    assert init.enable_cgroup_controllers(str(tmp_path)) == ["cpuset", "cpu", "io", "memory", "pids"]
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpuset +cpu +io +pids"


def test_hosts_file_names_the_host() -> None:
    text = init.hosts_file("pod-1")
    assert "127.0.0.1\tlocalhost" in text and "127.0.1.1\tpod-1" in text


def test_machine_buses(tmp_path: Path) -> None:
    (tmp_path / "platform/devices/LNRO0005:00").mkdir(parents=True)
    (tmp_path / "pci/devices").mkdir(parents=True)
    assert init.machine_buses(str(tmp_path)) == (False, True)
    (tmp_path / "pci/devices/0000:00:01.0").mkdir()
    (tmp_path / "platform/devices/LNRO0005:00").rmdir()
    assert init.machine_buses(str(tmp_path)) == (True, False)


def test_load_modules_in_listed_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listing = tmp_path / "modules"
    paths = ["/m/virtio_ring.ko", "/m/virtio.ko", "/m/virtio_pci.ko", "/m/virtio_mmio.ko",
             "/m/virtio_console.ko", "/m/overlay.ko", "/m/broken.ko"]
    listing.write_text(kmod.render_list(paths, header="test"))
    loaded: list[str] = []

    def fake_load(path: str, params: str = "") -> bool:
        if "broken" in path:
            raise CocoonError("finit_module failed", path=path)
        loaded.append(kmod.module_name(path))
        return True

    monkeypatch.setattr(kmod, "load", fake_load)
    monkeypatch.setattr(kmod, "is_loaded", lambda name, sys_module="/sys/module": name == "virtio_ring")
    monkeypatch.setattr(init, "machine_buses", lambda: (False, True))  # microvm: no PCI
    counts = init.load_modules(str(listing))
    assert loaded == ["virtio", "virtio_mmio", "virtio_console", "overlay"]
    assert counts == {"loaded": 4, "present": 1, "failed": 1, "skipped": 1}
    loaded.clear()
    init.load_modules(str(listing), early=True)
    assert loaded == ["virtio", "virtio_mmio", "virtio_console"]
    assert init.load_modules(str(tmp_path / "none")) == {"loaded": 0, "present": 0, "failed": 0, "skipped": 0}


def test_virtio_ports(tmp_path: Path) -> None:
    (tmp_path / "vport0p1").mkdir()
    (tmp_path / "vport0p1/name").write_text("cocoon.agent\n")
    (tmp_path / "vport0p2").mkdir()
    (tmp_path / "vport0p2/name").write_text("\n")
    assert init.virtio_ports(str(tmp_path)) == {"cocoon.agent": "/dev/vport0p1"}
    assert init.virtio_ports(str(tmp_path / "none")) == {}


def test_reap_children_collects_exit_codes() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    reaped: list[tuple[int, int]] = []
    for _ in range(200):
        reaped += init.reap_children()
        if reaped:
            break
        import time

        time.sleep(0.01)
    assert (pid, 7) in reaped


def test_setup_flow_with_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(init, "mount_all", lambda: calls.append("mount") or ["/proc"])
    monkeypatch.setattr(init, "read_cmdline", lambda: {"cocoon.hostname": "-bad-", "cocoon.log": "nope",
                                                       "cocoon.log_level": "LOUD"})
    monkeypatch.setattr(init, "load_modules", lambda early=None: calls.append(f"modules:{early}") or {})
    monkeypatch.setattr(init, "enable_cgroup_controllers", lambda: calls.append("cgroup") or [])
    monkeypatch.setattr(init, "set_hostname", lambda name: calls.append(f"hostname:{name}") or name)
    monkeypatch.setattr(init.os, "umask", lambda mask: 0o022)
    monkeypatch.setattr(init.os, "environ", {})
    log_setup: list[dict[str, object]] = []
    monkeypatch.setattr(init.cocoon_log, "setup", lambda **kw: log_setup.append(kw))
    monkeypatch.setattr(init.logging.getLogger("cocoon"), "handlers", [])
    cmd = init.setup(defer_modules=True)
    assert log_setup == [{"level": "info", "fmt": "json"}]  # bad values from the command line ignored
    assert cmd["cocoon.hostname"] == "-bad-"
    assert calls == ["mount", "modules:True", "cgroup", "hostname:cocoon"]
    monkeypatch.setattr(init, "read_cmdline", lambda: {"cocoon.modules": "0"})
    calls.clear()
    init.setup()
    assert "modules:None" not in calls and calls[0] == "mount"


INITRAMFS_INFO = ("1 1 0:2 / / rw - rootfs rootfs rw,size=112444k\n"
                  "22 1 0:21 / /proc rw,nosuid - proc proc rw\n")


def test_root_is_detached_on_the_initramfs_only() -> None:
    # The kernel's rootfs is its own parent: pivot_root(2) refuses to leave it (EINVAL).
    assert init.root_is_detached(INITRAMFS_INFO)
    # After attach_root: a bind of the initramfs moved onto / (parent: the hidden rootfs).
    attached = "40 1 0:2 / / rw - rootfs rootfs rw\n41 40 0:21 / /proc rw - proc proc rw\n"
    assert not init.root_is_detached(attached)
    assert not init.root_is_detached(INITRAMFS_INFO + "40 1 0:35 / / rw,relatime - tmpfs tmpfs rw\n")
    assert not init.root_is_detached("")


def test_attach_root_steps_with_fake_syscalls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(INITRAMFS_INFO)
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(init._Libc, "call", classmethod(lambda cls, *a: calls.append(a)))
    monkeypatch.setattr(init.os, "mkdir", lambda p, mode=0o777: calls.append(("mkdir", p)))
    monkeypatch.setattr(init.os, "rmdir", lambda p: calls.append(("rmdir", p)))
    monkeypatch.setattr(init.os, "chdir", lambda p: calls.append(("chdir", p)))
    monkeypatch.setattr(init.os, "chroot", lambda p: calls.append(("chroot", p)))
    assert init.attach_root(str(info)) == {"attached": True}
    tmp = init.ROOT_BIND_DIR
    assert calls == [
        ("mkdir", tmp),
        ("mount", b"/", tmp.encode(), None, init.MS_BIND | init.MS_REC, None),
        ("chdir", tmp),
        ("mount", b".", b"/", None, init.MS_MOVE, None),
        ("chroot", "."),
        ("chdir", "/"),
        ("rmdir", tmp),
    ]
    calls.clear()
    info.write_text("40 1 0:2 / / rw - rootfs rootfs rw\n")
    assert init.attach_root(str(info)) == {"attached": False}  # idempotent
    assert calls == []
