"""Container logic of the agent that needs no VM: guest spec, crun command lines, cgroup files, storages."""

from __future__ import annotations

import json
import stat

import pytest

from cocoon.agent import cgroups, crun, guestspec, mounts
from cocoon.agent.containers import Status, read_pid_file, resolv_conf
from cocoon.errors import InvalidArgument, ProcessError
from cocoon.oci.defaults import default_spec
from cocoon.protocol import convert
from cocoon.protocol.types import ContainerStats, CpuStats, IoDeviceStats, MemoryStats, PidsStats, Storage

# ---- guest spec


def host_spec() -> dict:
    spec = default_spec()
    spec["root"] = {"path": "/run/cocoon/shared/c1/rootfs", "readonly": True}
    spec["process"]["terminal"] = False
    spec["process"]["apparmorProfile"] = "docker-default"
    spec["process"]["selinuxLabel"] = "system_u:system_r:container_t:s0"
    spec["hooks"] = {"prestart": [{"path": "/usr/bin/netns-hook"}]}
    linux = spec["linux"]
    linux["namespaces"] = [
        {"type": "pid"},
        {"type": "network", "path": "/var/run/netns/cni-123"},
        {"type": "ipc", "path": "/proc/42/ns/ipc"},
        {"type": "uts", "path": "/proc/42/ns/uts"},
        {"type": "mount"},
        {"type": "cgroup", "path": "/proc/42/ns/cgroup"},
    ]
    linux["cgroupsPath"] = "/kubepods/besteffort/pod1/c1"
    linux["mountLabel"] = "system_u:object_r:container_file_t:s0"
    linux["devices"] = [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]
    linux["resources"] = {"network": {"classID": 1}, "pids": {"limit": 100}, "devices": [{"allow": False,
                                                                                         "access": "rwm"}]}
    linux["seccomp"] = {"defaultAction": "SCMP_ACT_ERRNO", "listenerPath": "/run/seccomp-agent.sock"}
    return spec


def test_adjust_spec_drops_what_cannot_work_in_the_vm() -> None:
    spec = host_spec()
    before = json.dumps(spec, sort_keys=True)
    out, notes = guestspec.adjust_spec(spec, "c1", cgroups.cgroups_path("c1"))
    assert json.dumps(spec, sort_keys=True) == before  # input untouched
    linux = out["linux"]
    assert linux["cgroupsPath"] == "/cocoon/c1"
    assert out["ociVersion"] == "1.1.0"  # default_spec() writes 1.2.x: too new for the guest's crun
    assert linux["namespaces"] == [{"type": "pid"}, {"type": "mount"}, {"type": "cgroup"}]
    assert "hooks" not in out
    assert "apparmorProfile" not in out["process"] and "selinuxLabel" not in out["process"]
    assert "mountLabel" not in linux and "devices" not in linux
    assert linux["resources"] == {"pids": {"limit": 100}, "devices": [{"allow": False, "access": "rwm"}]}
    assert linux["seccomp"] == {"defaultAction": "SCMP_ACT_ERRNO"}
    # Kept as the host sent them.
    assert out["root"] == spec["root"] and out["mounts"] == spec["mounts"]
    assert out["process"]["args"] == spec["process"]["args"]
    text = " | ".join(notes)
    for word in ("ociVersion", "network namespace dropped", "ipc namespace path dropped",
                 "cgroup namespace path dropped", "hooks", "apparmorProfile", "selinuxLabel", "mountLabel",
                 "linux.devices", "listenerPath"):
        assert word in text


def test_adjust_spec_keeps_start_container_hooks_for_crun() -> None:
    # startContainer hooks run in the container's namespaces (crun runs them); the others are host programs.
    spec = host_spec()
    start = [{"path": "/bin/sh", "args": ["sh", "-c", "echo hi > /tmp/x"], "env": ["A=1"], "timeout": 5}]
    spec["hooks"] = {"prestart": [{"path": "/usr/bin/netns-hook"}], "startContainer": start,
                     "poststop": [{"path": "/bin/true"}]}
    out, notes = guestspec.adjust_spec(spec, "c1", cgroups.cgroups_path("c1"))
    assert out["hooks"] == {"startContainer": start}
    assert any("prestart" in n and "poststop" in n and "host" in n for n in notes)
    spec["hooks"] = {"startContainer": start}
    out, notes = guestspec.adjust_spec(spec, "c1", cgroups.cgroups_path("c1"))
    assert out["hooks"] == {"startContainer": start} and not any("hooks" in n for n in notes)


def test_adjust_spec_of_a_clean_spec_has_no_notes() -> None:
    spec = default_spec()
    spec["ociVersion"] = "1.0.2-dev"
    spec["root"] = {"path": "/rootfs"}
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    out, notes = guestspec.adjust_spec(spec, "c2", "/cocoon/c2")
    assert notes == []
    assert out["linux"]["cgroupsPath"] == "/cocoon/c2"


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda s: s.update(root={"path": "rootfs"}), "absolute"),
    (lambda s: s.update(root={"path": "/"}), "root"),
    (lambda s: s.pop("root"), "root.path"),
    (lambda s: s.pop("process"), "no process"),
    (lambda s: s["process"].update(args=[]), "process.args"),
    (lambda s: s["process"].update(args=["sh", 1]), "process.args"),
    (lambda s: s["linux"].update(namespaces=["pid"]), "namespaces"),
])
def test_adjust_spec_refuses_bad_specs(mutate, match) -> None:
    spec = host_spec()
    mutate(spec)
    with pytest.raises(InvalidArgument, match=match):
        guestspec.adjust_spec(spec, "c1", "/cocoon/c1")


@pytest.mark.parametrize(("version", "expected"), [
    ("1.0.2-dev", "1.0.2-dev"), ("1.1.0", "1.1.0"), ("1.1.0+dev", "1.1.0+dev"), ("1.2.0", "1.1.0"),
    ("2.0.0", "1.1.0"), ("garbage", "1.1.0"), (None, "1.1.0"),
])
def test_oci_version_for_the_guest_crun(version, expected) -> None:
    spec = host_spec()
    spec["ociVersion"] = version
    assert guestspec.adjust_spec(spec, "c1", "/cocoon/c1")[0]["ociVersion"] == expected


def test_adjust_process_for_exec() -> None:
    proc = {"args": ["cat"], "cwd": "/", "terminal": True, "apparmorProfile": "x"}
    out, notes = guestspec.adjust_process(proc)
    assert out == {"args": ["cat"], "cwd": "/", "terminal": True}
    assert notes == ["process.apparmorProfile not enforced in the guest"]


def test_load_json_object() -> None:
    assert guestspec.load_json_object(b'{"a": 1}', "x") == {"a": 1}
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        guestspec.load_json_object(b"{", "oci_spec_json")
    with pytest.raises(InvalidArgument, match="JSON object"):
        guestspec.load_json_object(b"[1]", "oci_spec_json")
    with pytest.raises(InvalidArgument):
        guestspec.load_json_object(b"\xff\xfe", "oci_spec_json")


@pytest.mark.parametrize("good", ["c1", "abc-DEF_1.2+3", "a" * 64, "0"])
def test_ids_accepted(good: str) -> None:
    assert guestspec.check_id(good) == good


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "-x", "a" * 65, "a b", "x\0", "é"])
def test_ids_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        guestspec.check_id(bad, "exec id")


def test_devices_entries_and_cgroup_rules() -> None:
    entry = guestspec.device_entry("/dev/xvdb", "/dev/vdb", stat.S_IFBLK | 0o660, (254 << 8) | 16)
    assert entry == {"path": "/dev/xvdb", "type": "b", "major": 254, "minor": 16, "fileMode": 0o660,
                     "uid": 0, "gid": 0}
    with pytest.raises(InvalidArgument):
        guestspec.device_entry("/dev/x", "/tmp/file", stat.S_IFREG | 0o644, 0)
    spec = guestspec.with_devices({"linux": {}}, [entry])
    assert spec["linux"]["devices"] == [entry]
    assert spec["linux"]["resources"]["devices"] == [
        {"allow": True, "type": "b", "major": 254, "minor": 16, "access": "rwm"}]


# ---- crun command lines

CFG = crun.CrunConfig(binary="crun", root="/run/crun")


def test_crun_argv() -> None:
    log = "/run/cocoon/containers/c1/crun.log"
    base = ["crun", "--root", "/run/crun", "--log", log, "--log-format", "json"]
    assert crun.create_argv(CFG, "c1", "/b", "/b/init.pid", log_file=log) == [
        *base, "create", "--bundle", "/b", "--pid-file", "/b/init.pid", "c1"]
    assert crun.create_argv(CFG, "c1", "/b", "/b/init.pid", console_socket="/run/cocoon/tty/1.sock") == [
        "crun", "--root", "/run/crun", "create", "--bundle", "/b", "--pid-file", "/b/init.pid",
        "--console-socket", "/run/cocoon/tty/1.sock", "c1"]
    assert crun.exec_argv(CFG, "c1", "/b/exec-e.json", "/b/exec-e.pid", log_file=log) == [
        *base, "exec", "--process", "/b/exec-e.json", "--pid-file", "/b/exec-e.pid", "-d", "c1"]
    assert crun.exec_argv(CFG, "c1", "/p.json", "/p.pid", console_socket="/s")[-3:] == [
        "--console-socket", "/s", "c1"]
    assert crun.kill_argv(CFG, "c1", 15)[-3:] == ["kill", "c1", "15"]
    assert crun.kill_argv(CFG, "c1", 9, all_processes=True)[-4:] == ["kill", "--all", "c1", "9"]
    assert crun.simple_argv(CFG, "pause", "c1")[-2:] == ["pause", "c1"]
    assert crun.delete_argv(CFG, "c1")[-3:] == ["delete", "--force", "c1"]
    assert crun.update_argv(CFG, "c1", "/b/r.json")[-4:] == ["update", "--resources", "/b/r.json", "c1"]
    host = crun.CrunConfig(binary="/usr/bin/crun", root="/tmp/r", extra_args=("--cgroup-manager=disabled",))
    assert crun.simple_argv(host, "start", "c1") == ["/usr/bin/crun", "--root", "/tmp/r",
                                                      "--cgroup-manager=disabled", "start", "c1"]


def test_crun_last_error() -> None:
    log = "\n".join([
        json.dumps({"msg": "warning: x", "level": "warning", "time": "t"}),
        json.dumps({"msg": "first", "level": "error", "time": "t"}),
        json.dumps({"msg": "executable file `nope` not found in $PATH: No such file", "level": "error"}),
        "",
    ])
    assert crun.last_error(log) == "executable file `nope` not found in $PATH: No such file"
    assert crun.last_error("plain text failure\n\n") == "plain text failure"
    assert crun.last_error("") == ""


def test_pid_file(tmp_path) -> None:
    (tmp_path / "ok.pid").write_text("1234")
    assert read_pid_file(str(tmp_path / "ok.pid")) == 1234
    (tmp_path / "bad.pid").write_text("")
    with pytest.raises(ProcessError):
        read_pid_file(str(tmp_path / "bad.pid"))
    with pytest.raises(ProcessError):
        read_pid_file(str(tmp_path / "missing.pid"))


def test_status_transitions() -> None:
    assert Status.CREATED.can_start() and not Status.RUNNING.can_start()
    assert Status.RUNNING.can_exec() and not Status.PAUSED.can_exec() and not Status.STOPPED.can_exec()
    assert Status.RUNNING.can_pause() and not Status.PAUSED.can_pause()
    assert Status.PAUSED.can_resume() and not Status.RUNNING.can_resume()


def test_resolv_conf() -> None:
    assert resolv_conf(["10.0.0.1", "nameserver 1.1.1.1", "search svc.cluster.local", " "]) == (
        "nameserver 10.0.0.1\nnameserver 1.1.1.1\nsearch svc.cluster.local\n")


# ---- cgroup v2 files

CPU_STAT = """usage_usec 123456
user_usec 100000
system_usec 23456
core_sched.force_idle_usec 0
nr_periods 10
nr_throttled 2
throttled_usec 5000
nr_bursts 0
burst_usec 0
"""
MEMORY_STAT = "anon 1048576\nfile 4096\nkernel 8192\npgfault 77\nbroken line here\n"
IO_STAT = ("254:0 rbytes=1024 wbytes=2048 rios=3 wios=4 dbytes=0 dios=0\n"
           "254:16 rbytes=7 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n")


def test_parse_cgroup_files() -> None:
    assert cgroups.cpu_stats(CPU_STAT) == CpuStats(123456, 100000, 23456, 10, 2, 5000)
    assert cgroups.parse_flat_keyed(MEMORY_STAT) == {"anon": 1048576, "file": 4096, "kernel": 8192, "pgfault": 77}
    assert cgroups.parse_limit("max\n") == 0
    assert cgroups.parse_limit("268435456\n") == 268435456
    assert cgroups.parse_limit("") == 0
    assert cgroups.parse_io_stat(IO_STAT) == (
        IoDeviceStats(254, 0, 1024, 2048, 3, 4), IoDeviceStats(254, 16, 7, 0, 1, 0))
    assert cgroups.parse_io_stat("garbage\n\n") == ()


def test_stats_from_a_cgroup_directory(tmp_path) -> None:
    files = {"cpu.stat": CPU_STAT, "memory.current": "2097152\n", "memory.max": "max\n", "memory.stat": MEMORY_STAT,
             "memory.swap.current": "0\n", "pids.current": "3\n", "pids.max": "50\n", "io.stat": IO_STAT}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    stats = cgroups.read_stats(str(tmp_path))  # memory.swap.max missing: zero, not an error
    assert stats.memory == MemoryStats(usage=2097152, limit=0, swap_usage=0, swap_limit=0,
                                       stat={"anon": 1048576, "file": 4096, "kernel": 8192, "pgfault": 77})
    assert stats.pids == PidsStats(current=3, limit=50)
    assert stats.cpu.usage_usec == 123456
    assert len(stats.io) == 2
    assert cgroups.read_stats(str(tmp_path / "gone")) == ContainerStats()


def test_stats_round_trip_through_protobuf() -> None:
    stats = cgroups.stats_from_files({"cpu.stat": CPU_STAT, "memory.current": "5", "memory.stat": MEMORY_STAT,
                                      "pids.current": "1", "pids.max": "max", "io.stat": IO_STAT})
    assert convert.stats_from_pb(convert.stats_to_pb(stats)) == stats


def test_pids_and_oom_counter(tmp_path) -> None:
    (tmp_path / "cgroup.procs").write_text("10\n11\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cgroup.procs").write_text("12\n10\n")
    assert cgroups.read_pids(str(tmp_path)) == [10, 11, 12]
    assert cgroups.oom_kills(str(tmp_path)) == 0
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 1\noom_group_kill 0\n")
    assert cgroups.oom_kills(str(tmp_path)) == 1
    assert cgroups.cgroup_dir("c1", "/sys/fs/cgroup") == "/sys/fs/cgroup/cocoon/c1"


# ---- storages


def test_mount_options() -> None:
    flags, data = mounts.parse_options(["ro", "nosuid", "nodev", "size=64m", "mode=1777"])
    assert flags == mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV
    assert data == "size=64m,mode=1777"
    assert mounts.parse_options(["ro", "rw"]) == (0, "")
    assert mounts.parse_options([]) == (0, "")


def test_storage_validation() -> None:
    mounts.validate(Storage(driver="virtio-fs", source="rootfs", mount_point="/run/cocoon/shared"))
    mounts.validate(Storage(driver="tmpfs", mount_point="/run/x"))
    mounts.validate(Storage(driver="local", mount_point="/run/x"))
    for bad in (Storage(driver="blk", mount_point="/x"), Storage(driver="virtio-fs", mount_point="/x"),
                Storage(driver="tmpfs", mount_point="relative"), Storage(driver="tmpfs", mount_point="/a/../b"),
                Storage(driver="tmpfs", mount_point="/")):
        with pytest.raises(InvalidArgument):
            mounts.validate(bad)
    assert mounts.local_mode(("mode=0750",)) == 0o750
    assert mounts.local_mode(()) == 0o777
    with pytest.raises(InvalidArgument):
        mounts.local_mode(("mode=rwx",))


def test_local_storage_is_a_directory(tmp_path) -> None:
    s = Storage(driver="local", mount_point=str(tmp_path / "vol"), options=("mode=0700",))
    m = mounts.mount_storage(s)
    assert (tmp_path / "vol").is_dir() and stat.S_IMODE((tmp_path / "vol").stat().st_mode) == 0o700
    (tmp_path / "vol" / "f").write_text("x")
    mounts.unmount_storage(m)
    assert not (tmp_path / "vol").exists()


def test_storage_round_trip_through_protobuf() -> None:
    s = Storage(driver="virtio-fs", mount_point="/run/cocoon/shared", source="rootfs", fstype="virtiofs",
                options=("ro",), driver_options=("x=1",))
    assert convert.storage_from_pb(convert.storage_to_pb(s)) == s


def test_crun_create_never_uses_no_pivot() -> None:
    # The guest's init makes / a mount with a parent (init.attach_root), so crun can pivot_root(2).
    assert not hasattr(crun.CrunConfig(), "no_pivot")
    argv = crun.create_argv(crun.CrunConfig(), "c1", "/b", "/b/p", console_socket="/s")
    assert "--no-pivot" not in argv
    assert argv[-7:] == ["create", "--bundle", "/b", "--pid-file", "/b/p", "--console-socket", "/s", "c1"][-7:]


def test_oom_kill_is_reported_when_the_init_exits(tmp_path) -> None:
    # An OOM-killed init ends the container at once: the kill must be queued before its exit status is
    # answered (the host tears the VM down right after), not left to the next poll of the watcher.
    import asyncio

    from cocoon.agent.containers import Container, ContainerManager, ManagerConfig, Process
    from cocoon.agent.stdio import ProcessIO

    async def go() -> None:
        loop = asyncio.get_running_loop()
        mgr = ContainerManager(reaper=None, cfg=ManagerConfig(in_guest=False, oom_poll_interval=3600))  # type: ignore[arg-type]
        (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
        io, child = ProcessIO.pipes()
        child.close()
        init = Process("", 42, io, loop.create_future())
        c = Container("c1", str(tmp_path / "b"), str(tmp_path), init, [])
        init.exit.add_done_callback(lambda _f: mgr._init_exited(c))
        mgr._containers["c1"] = c
        waiter = asyncio.ensure_future(mgr.oom_event())
        for _ in range(3):  # the watcher's first poll (oom_kill 0), then it sleeps for an hour
            await asyncio.sleep(0)
        (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
        init.exit.set_result(137)
        await asyncio.sleep(0)
        assert await asyncio.wait_for(waiter, 1) == "c1"
        assert c.oom_kills == 1
        io.close()
        mgr._oom_task.cancel()  # type: ignore[union-attr]

    asyncio.run(go())


def test_read_process_from_proc(tmp_path) -> None:
    import os

    from cocoon.agent.procs import read_process, read_processes

    me = read_process(os.getpid())
    assert me is not None and me.pid == os.getpid() and me.ppid == os.getppid() and me.uid == os.getuid()
    assert me.state in ("R", "S") and "python" in me.command
    # A comm with spaces and parentheses; no cmdline (a kernel thread, a zombie): "[comm]".
    fake = tmp_path / "42"
    fake.mkdir()
    (fake / "stat").write_text("42 (odd) name)) Z 7 42 42 0 -1\n")
    (fake / "status").write_text("Name:\todd\nUid:\t1000\t1000\t1000\t1000\n")
    (fake / "cmdline").write_bytes(b"")
    got = read_process(42, proc=str(tmp_path))
    assert got is not None and (got.ppid, got.uid, got.state, got.command) == (7, 1000, "Z", "[odd) name)]")
    assert read_processes([43, 42], proc=str(tmp_path)) == [got]  # 43 is gone: skipped
