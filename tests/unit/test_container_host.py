"""Host-side container logic that needs no VM: sharing plan, signals, sizing, hooks, console socket."""

from __future__ import annotations

import array
import dataclasses
import json
import os
import socket
import stat

import pytest

from cocoon import config
from cocoon.api import hooks, stdio
from cocoon.api.container import parse_signal
from cocoon.api.monitor import vm_size
from cocoon.errors import InvalidArgument, NotFound, ProcessError
from cocoon.oci import spec as oci
from cocoon.oci.model import Hook
from cocoon.storage import shared


def _bundle(tmp_path, **overrides):
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir(exist_ok=True)
    (tmp_path / "vol").mkdir(exist_ok=True)
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    doc = oci.default_spec()
    doc["process"]["terminal"] = False
    doc["mounts"].append(
        {"destination": "/data", "type": "bind", "source": str(tmp_path / "vol"), "options": ["rbind", "ro"]}
    )
    doc["mounts"].append({"destination": "/etc/hosts", "type": "none", "source": "hosts", "options": ["bind"]})
    doc["mounts"].append({"destination": "/x", "type": "nfs", "source": "server:/x"})
    doc["hooks"] = {"poststop": [{"path": "/bin/true"}]}
    doc.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(doc))
    return oci.load(str(tmp_path))


def test_plan_keeps_only_start_container_hooks_for_the_guest(tmp_path):
    start = {"path": "/bin/sh", "args": ["sh", "-c", "touch /tmp/started"]}
    spec = _bundle(tmp_path, hooks={"prestart": [{"path": "/bin/true"}], "createRuntime": [{"path": "/bin/true"}],
                                    "startContainer": [start], "poststart": [{"path": "/bin/true"}]})
    g = shared.plan(spec, "c1", tmp_path / "share").guest_spec
    assert g["hooks"] == {"startContainer": [start]}  # crun runs it in the container, in the guest
    assert spec.raw["hooks"]["prestart"]  # the loaded spec is not mutated


def test_plan_rewrites_root_and_bind_mounts_for_the_guest(tmp_path):
    spec = _bundle(tmp_path)
    plan = shared.plan(spec, "c1", tmp_path / "share")
    g = plan.guest_spec
    assert g["root"]["path"] == "/run/cocoon/shared/c1/rootfs"
    assert "hooks" not in g  # only poststop: a host hook
    by_dest = {m["destination"]: m for m in g["mounts"]}
    assert by_dest["/data"]["source"].startswith("/run/cocoon/shared/c1/mounts/")
    assert by_dest["/data"]["options"] == ["rbind", "ro"]
    assert by_dest["/etc/hosts"]["type"] == "bind"
    assert "/x" not in by_dest  # nfs cannot be made in the guest: skipped with a warning
    assert by_dest["/proc"]["type"] == "proc"  # the guest makes these itself
    binds = {b.target: b for b in plan.binds}
    assert binds["c1/rootfs"].source == spec.root.path and binds["c1/rootfs"].is_dir
    ro = [b for b in plan.binds if b.readonly]
    assert len(ro) == 1 and ro[0].source == tmp_path / "vol"
    hosts = [b for b in plan.binds if b.source == tmp_path / "hosts"]
    assert hosts and not hosts[0].is_dir
    assert spec.raw["root"]["path"] == "rootfs"  # the loaded spec is not mutated


def test_plan_refuses_missing_sources(tmp_path):
    spec = _bundle(tmp_path)
    (tmp_path / "hosts").unlink()
    with pytest.raises(NotFound, match="bind mount source not found") as info:
        shared.plan(spec, "c1", tmp_path / "share")
    assert info.value.field.startswith("mounts[")


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_share_binds_and_undoes_everything(tmp_path):
    from cocoon.api.pod_share import PodShare

    spec = _bundle(tmp_path)
    (spec.root.path / "marker").write_text("x")
    share = PodShare(tmp_path / "share")
    with share as host_dir:
        plan = share.add(spec, "c1")
        assert (host_dir / "c1/rootfs/marker").read_text() == "x"
        hosts_target = next(b.target for b in plan.binds if b.source == tmp_path / "hosts")
        assert (host_dir / hosts_target).read_text().startswith("127.0.0.1")
        ro_target = next(b.target for b in plan.binds if b.readonly)
        with pytest.raises(OSError):
            (host_dir / ro_target / "new").write_text("no")  # read-only bind
        assert shared.mounts_below(host_dir)
    assert not shared.mounts_below(tmp_path / "share")
    assert not (tmp_path / "share").exists()
    assert (spec.root.path / "marker").read_text() == "x"  # the rootfs itself is untouched


@pytest.mark.parametrize(("text", "num"), [("9", 9), ("KILL", 9), ("SIGKILL", 9), ("term", 15), ("SIGUSR1", 10)])
def test_parse_signal(text, num):
    assert parse_signal(text) == num


@pytest.mark.parametrize("text", ["0", "99", "SIGNOPE", "", "-9"])
def test_parse_signal_refuses(text):
    with pytest.raises(InvalidArgument, match="invalid signal"):
        parse_signal(text)


def test_vm_size_adds_container_limits(tmp_path):
    cfg = config.Config()
    spec = _bundle(tmp_path)
    assert vm_size(cfg, spec) == (256, 1)
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["linux"]["resources"] = {"memory": {"limit": 512 * 1024 * 1024}, "cpu": {"quota": 200000, "period": 100000}}
    (tmp_path / "config.json").write_text(json.dumps(doc))
    memory, vcpus = vm_size(cfg, oci.load(str(tmp_path)))
    assert memory == 256 + 512
    assert vcpus == min(2, os.cpu_count() or 1)


def test_hooks_get_state_on_stdin_and_failures_are_clear(tmp_path):
    out = tmp_path / "seen"
    script = tmp_path / "hook.sh"
    script.write_text(f'#!/bin/sh\ncat > {out}\necho >> {out}\necho "$HOOKVAR" >> {out}\n')
    script.chmod(0o755)
    hooks.run_hooks("poststart", [Hook(str(script), env=("HOOKVAR=yes",))], {"id": "c1", "status": "running"})
    text = out.read_text()
    assert json.loads(text.splitlines()[0])["id"] == "c1" and text.splitlines()[1] == "yes"
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/sh\necho broken >&2\nexit 4\n")
    bad.chmod(0o755)
    with pytest.raises(ProcessError, match="createRuntime hook failed") as info:
        hooks.run_hooks("createRuntime", [Hook(str(bad))], {})
    assert info.value.exit_code == 4 and "broken" in info.value.stderr
    with pytest.raises(ProcessError, match="cannot run"):
        hooks.run_hooks("prestart", [Hook(str(tmp_path / "missing"))], {})
    slow = tmp_path / "slow.sh"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    with pytest.raises(ProcessError, match="timed out"):
        hooks.run_hooks("prestart", [Hook(str(slow), timeout=1)], {})
    hooks.run_hooks("poststop", [Hook(str(bad))], {}, fatal=False)  # logged, not raised


def test_console_socket_receives_a_pty_master(tmp_path):
    path = str(tmp_path / "console.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    slave = stdio.open_console(path, 30, 100)
    try:
        conn, _ = listener.accept()
        _, ancdata, _, _ = conn.recvmsg(1024, socket.CMSG_SPACE(4))
        fds = array.array("i")
        fds.frombytes(ancdata[0][2])
        master = fds[0]
        assert stat.S_ISCHR(os.fstat(master).st_mode)
        assert stdio.window_size(slave) == (30, 100)
        os.write(master, b"hi")
        assert os.read(slave, 10) == b"hi"  # raw mode: bytes pass through unchanged
        os.close(master)
        conn.close()
    finally:
        os.close(slave)
        listener.close()


def test_console_socket_that_nobody_listens_on(tmp_path):
    with pytest.raises(InvalidArgument, match="console socket"):
        stdio.open_console(str(tmp_path / "nobody.sock"))


def test_stdin_is_null():
    fd = os.open("/dev/null", os.O_RDONLY)
    r, w = os.pipe()
    try:
        assert stdio.stdin_is_null(fd)
        assert not stdio.stdin_is_null(r)
        assert stdio.stdin_is_null(9999)
    finally:
        for f in (fd, r, w):
            os.close(f)


def test_config_dataclass_replace_still_works():
    cfg = config.Config()
    assert dataclasses.replace(cfg.runtime, root="/x").root == "/x"
