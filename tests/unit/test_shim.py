"""containerd-shim-cocoon-v2 without a VM: flags, start/delete logic, fifo relays, event publishing,
the task service's handling of a pod's sandbox container (the pause, which has no guest process)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from cocoon import config
from cocoon.errors import AlreadyExists, InvalidArgument, NotFound, StateError
from cocoon.protocol.gen.containerd.cgroups.v2 import metrics_pb2
from cocoon.protocol.gen.containerd.events import task_pb2 as ev
from cocoon.protocol.gen.containerd.services.events.ttrpc.v1 import events_pb2
from cocoon.protocol.gen.containerd.task.v2 import shim_pb2 as pb
from cocoon.protocol.ttrpc import Server
from cocoon.protocol.ttrpc.errors import Unimplemented
from cocoon.protocol.types import ContainerStats, CpuStats, IoDeviceStats, MemoryStats, PidsStats
from cocoon.shim import events, launcher
from cocoon.shim import main as shim_main
from cocoon.shim.fifo_io import ProcessIO, open_output
from cocoon.shim.service import TaskService, metrics
from cocoon.shim.tasks import PAUSED, RUNNING, STOPPED, PauseProcess, Task
from cocoon.storage import rootfs


# -- flags ----------------------------------------------------------------------------------------
def test_version_flag(capsys):
    assert shim_main.main(["-v"]) == 0
    assert "containerd-shim-cocoon-v2" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["-id", "x", "start"], "namespace cannot be empty"),
    (["-namespace", "ns", "start"], "id cannot be empty"),
])  # fmt: skip
def test_missing_flags_fail_with_one_line(argv, message, capsys):
    assert shim_main.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unknown_action_is_refused():
    with pytest.raises(SystemExit):
        shim_main.main(["-namespace", "ns", "-id", "x", "explode"])


def test_long_lived_shim_needs_start(monkeypatch, capsys):
    monkeypatch.delenv(launcher.ENV_LISTEN_FD, raising=False)
    assert shim_main.main(["-namespace", "ns", "-id", "x"]) == 1
    assert "started by `start`" in capsys.readouterr().err


# -- start / delete -------------------------------------------------------------------------------
def _bundle(tmp_path: Path, annotations: dict[str, str] | None = None) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": annotations or {}}))
    return bundle


def _cfg(tmp_path: Path) -> config.Config:
    import dataclasses

    cfg = config.Config()
    return dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, root=str(tmp_path / "root")))


def test_pod_containers_are_grouped_by_their_sandbox(tmp_path):
    pod = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod1"}
    assert launcher.group_of("c1", pod) == "pod1"
    assert launcher.group_of("pod1", {"io.kubernetes.cri.container-type": "sandbox"}) == "pod1"
    assert launcher.group_of("c2", {}) == "c2"
    cfg = _cfg(tmp_path)
    a = launcher.state_dir_for(cfg, launcher.Options("ns", "c1", address="/c.sock"), "pod1")
    b = launcher.state_dir_for(cfg, launcher.Options("ns2", "c1", address="/c.sock"), "pod1")
    assert a != b and a.parent == tmp_path / "root" / "s"
    assert a == launcher.state_dir_for(cfg, launcher.Options("ns", "other", address="/c.sock"), "pod1")


def test_annotations_errors_name_the_file(tmp_path):
    with pytest.raises(NotFound, match=r"config\.json"):
        launcher.read_annotations(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidArgument) as info:
        launcher.read_annotations(tmp_path)
    assert info.value.context["file"] == str(tmp_path / "config.json")


def test_start_of_a_pod_container_without_its_shim_fails(tmp_path):
    pod = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod1"}
    opts = launcher.Options("ns", "c1", address="/c.sock", bundle=str(_bundle(tmp_path, pod)))
    with pytest.raises(NotFound, match="no running shim"):
        launcher.start(_cfg(tmp_path), opts)
    assert not (tmp_path / "bundle" / "address").exists()


def test_delete_after_a_dead_shim_removes_its_state(tmp_path):
    cfg = _cfg(tmp_path)
    opts = launcher.Options("ns", "c1", address="/c.sock", bundle=str(_bundle(tmp_path)))
    state = launcher.state_dir_for(cfg, opts, "c1")
    state.mkdir(parents=True)
    (state / "agent.sock").touch()
    (state / "console.log").write_text("x")
    status, when = launcher.delete(cfg, opts)
    assert status == 128 + signal.SIGKILL and when > 0
    assert not state.exists()


def test_delete_output_is_a_delete_response(tmp_path, capsysbinary, monkeypatch):
    monkeypatch.setenv("COCOON_CONFIG", str(tmp_path / "c.toml"))
    (tmp_path / "c.toml").write_text(f'[runtime]\nroot = "{tmp_path}/root"\n')
    bundle = _bundle(tmp_path)
    assert shim_main.main(["-namespace", "ns", "-id", "c1", "-bundle", str(bundle), "delete"]) == 0
    response = pb.DeleteResponse.FromString(capsysbinary.readouterr().out)
    assert response.exit_status == 137 and response.exited_at.seconds > 0


# -- stdio relays ----------------------------------------------------------------------------------
class FakeGuest:
    """The guest side of a process for the relay: scripted output, recorded input."""

    def __init__(self, stdout: list[bytes], stderr: list[bytes] | None = None) -> None:
        self.out, self.err = list(stdout), list(stderr or [])
        self.stdin = bytearray()
        self.stdin_closed = asyncio.Event()

    async def read_stdout(self, n: int = 65536) -> bytes:
        await asyncio.sleep(0)
        return self.out.pop(0) if self.out else b""

    async def read_stderr(self, n: int = 65536) -> bytes:
        await asyncio.sleep(0)
        return self.err.pop(0) if self.err else b""

    async def write_stdin(self, data: bytes) -> int:
        self.stdin += data
        return len(data)

    async def close_stdin(self) -> None:
        self.stdin_closed.set()


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


async def test_output_reaches_the_fifos_before_drained(tmp_path):
    out, err = _fifo(tmp_path / "out"), _fifo(tmp_path / "err")
    r_out = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    r_err = os.open(err, os.O_RDONLY | os.O_NONBLOCK)
    io = ProcessIO("c1", "", out, err, terminal=False)
    io.open()
    io.attach(FakeGuest([b"hello ", b"world\n"], [b"oops\n"]))
    await asyncio.wait_for(io.drained(), 5)
    io.close()
    assert os.read(r_out, 100) == b"hello world\n"
    assert os.read(r_err, 100) == b"oops\n"
    assert os.read(r_out, 100) == b""  # our write end is closed: EOF for containerd
    os.close(r_out)
    os.close(r_err)


async def test_output_without_a_reader_yet_is_kept_for_it(tmp_path):
    out = _fifo(tmp_path / "out")
    fd = open_output(out)  # no reader: opened read-write instead of failing with ENXIO
    os.write(fd, b"early")
    reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    assert os.read(reader, 100) == b"early"
    os.close(fd)
    os.close(reader)


async def test_a_reader_that_goes_away_does_not_block_the_process(tmp_path):
    out = _fifo(tmp_path / "out")
    reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    io = ProcessIO("c1", "", out, "", terminal=False)
    io.open()
    os.close(reader)  # containerd's client left: writes fail with EPIPE from now on
    guest = FakeGuest([b"x" * 100_000, b"more"])
    io.attach(guest)
    await asyncio.wait_for(io.drained(), 5)
    assert guest.out == []  # everything was read from the guest all the same
    io.close()


async def test_stdin_waits_for_its_writer_and_forwards_eof(tmp_path):
    fifo = _fifo(tmp_path / "in")
    io = ProcessIO("c1", fifo, "", "", terminal=False)
    io.open()
    guest = FakeGuest([])
    io.attach(guest)
    await asyncio.sleep(0.05)
    assert not guest.stdin_closed.is_set()  # no writer yet is not end of input
    writer = os.open(fifo, os.O_WRONLY)
    os.write(writer, b"echo hi\n")
    os.close(writer)
    await asyncio.wait_for(guest.stdin_closed.wait(), 5)
    assert bytes(guest.stdin) == b"echo hi\n"
    io.close()


async def test_close_io_ends_the_input(tmp_path):
    fifo = _fifo(tmp_path / "in")
    io = ProcessIO("c1", fifo, "", "", terminal=True)
    io.open()
    guest = FakeGuest([])
    io.attach(guest)
    await io.close_stdin()
    assert guest.stdin_closed.is_set()
    io.close()


def test_missing_fifo_is_a_clear_error_and_leaks_nothing(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    io = ProcessIO("c1", "", str(_fifo(tmp_path / "out")), str(tmp_path / "nope" / "err"), terminal=False)
    reader = os.open(tmp_path / "out", os.O_RDONLY | os.O_NONBLOCK)
    with pytest.raises(NotFound, match="cannot open stdio"):
        io.open()
    os.close(reader)
    assert len(os.listdir("/proc/self/fd")) == before


# -- events ---------------------------------------------------------------------------------------
class Collector:
    def __init__(self) -> None:
        self.got: list[events_pb2.Envelope] = []

    async def Forward(self, request, ctx):
        from google.protobuf.empty_pb2 import Empty

        self.got.append(request.envelope)
        return Empty()


async def _events_server(path: Path) -> tuple[Server, Collector]:
    collector = Collector()
    server = Server()
    server.register_service(events_pb2.DESCRIPTOR.services_by_name["Events"], collector)
    await server.serve_unix(path)
    return server, collector


async def test_events_arrive_in_order_with_containerd_type_urls(tmp_path):
    server, collector = await _events_server(tmp_path / "ttrpc.sock")
    publisher = events.Publisher(f"unix://{tmp_path}/ttrpc.sock", "k8s.io")
    publisher.start()
    publisher.publish(events.TASK_CREATE, ev.TaskCreate(container_id="c1", pid=7))
    publisher.publish(events.TASK_START, ev.TaskStart(container_id="c1", pid=7))
    publisher.publish(events.TASK_EXIT, ev.TaskExit(container_id="c1", exit_status=3))
    await publisher.close()
    await server.close()
    assert [e.topic for e in collector.got] == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    assert {e.namespace for e in collector.got} == {"k8s.io"}
    assert collector.got[2].event.type_url == "containerd.events.TaskExit"
    assert ev.TaskExit.FromString(collector.got[2].event.value).exit_status == 3


async def test_events_wait_for_containerd_to_come_back(tmp_path):
    publisher = events.Publisher(str(tmp_path / "ttrpc.sock"), "ns")
    publisher.start()
    publisher.publish(events.TASK_OOM, ev.TaskOOM(container_id="c1"))
    await asyncio.sleep(0.3)  # containerd is down (restarting)
    server, collector = await _events_server(tmp_path / "ttrpc.sock")
    await publisher.close()
    await server.close()
    assert [e.topic for e in collector.got] == ["/tasks/oom"]


async def test_events_are_dropped_after_the_retry_window(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "RETRY_SECONDS", 0.2)
    publisher = events.Publisher(str(tmp_path / "nobody.sock"), "ns")
    publisher.start()
    publisher.publish(events.TASK_OOM, ev.TaskOOM(container_id="c1"))
    await publisher.close()
    assert (publisher.sent, publisher.dropped) == (0, 1)


# -- the task service, for a pod's sandbox container ----------------------------------------------
def _service(tmp_path: Path) -> tuple[TaskService, list[tuple[str, object]], list[bool]]:
    published: list[tuple[str, object]] = []
    shut: list[bool] = []
    publisher = SimpleNamespace(publish=lambda topic, event: published.append((topic, event)))
    svc = TaskService(_cfg(tmp_path), tmp_path / "state", publisher, on_shutdown=lambda: shut.append(True))  # type: ignore[arg-type]
    io = ProcessIO("pod1", "", "", "", terminal=False)
    svc.tasks["pod1"] = Task("pod1", tmp_path, PauseProcess("pod1", "", io, pid=svc.pid), owns_sandbox=True)
    return svc, published, shut


async def test_the_pause_behaves_like_pause(tmp_path):
    svc, published, shut = _service(tmp_path)
    started = await svc.Start(pb.StartRequest(id="pod1"), None)
    assert started.pid == os.getpid()
    state = await svc.State(pb.StateRequest(id="pod1"), None)
    assert state.status == RUNNING and state.bundle == str(tmp_path)
    await svc.Pause(pb.PauseRequest(id="pod1"), None)
    assert (await svc.State(pb.StateRequest(id="pod1"), None)).status == PAUSED
    await svc.Resume(pb.ResumeRequest(id="pod1"), None)
    await svc.Kill(pb.KillRequest(id="pod1", signal=signal.SIGHUP), None)  # ignored, like pause does
    assert (await svc.State(pb.StateRequest(id="pod1"), None)).status == RUNNING
    with pytest.raises(StateError):
        await svc.Delete(pb.DeleteRequest(id="pod1"), None)
    waiting = asyncio.ensure_future(svc.Wait(pb.WaitRequest(id="pod1"), None))
    await svc.Kill(pb.KillRequest(id="pod1", signal=signal.SIGTERM), None)
    assert (await waiting).exit_status == 0
    with pytest.raises(NotFound, match="already finished"):
        await svc.Kill(pb.KillRequest(id="pod1", signal=signal.SIGKILL), None)
    assert (await svc.State(pb.StateRequest(id="pod1"), None)).status == STOPPED
    deleted = await svc.Delete(pb.DeleteRequest(id="pod1"), None)
    assert deleted.exit_status == 0 and deleted.exited_at.seconds > 0
    topics = [t for t, _ in published]
    assert topics == ["/tasks/start", "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete"]
    await svc.Shutdown(pb.ShutdownRequest(id="pod1"), None)
    await asyncio.sleep(0)
    assert shut == [True]


async def test_what_the_pause_refuses(tmp_path):
    svc, _, shut = _service(tmp_path)
    with pytest.raises(StateError):
        await svc.Kill(pb.KillRequest(id="pod1", signal=signal.SIGTERM), None)  # not started yet
    with pytest.raises(InvalidArgument, match="sandbox container"):
        await svc.Exec(pb.ExecProcessRequest(id="pod1", exec_id="e1"), None)
    with pytest.raises(Unimplemented):
        await svc.Checkpoint(pb.CheckpointTaskRequest(id="pod1"), None)
    with pytest.raises(NotFound):
        await svc.State(pb.StateRequest(id="nope"), None)
    with pytest.raises(NotFound):
        await svc.State(pb.StateRequest(id="pod1", exec_id="e9"), None)
    with pytest.raises(AlreadyExists):
        await svc.Create(pb.CreateTaskRequest(id="pod1", bundle=str(tmp_path)), None)
    await svc.Shutdown(pb.ShutdownRequest(id="pod1"), None)  # a task is left: the shim stays
    await asyncio.sleep(0)
    assert shut == []
    connected = await svc.Connect(pb.ConnectRequest(id="pod1"), None)
    assert connected.shim_pid == connected.task_pid == os.getpid()
    stats = await svc.Stats(pb.StatsRequest(id="pod1"), None)
    assert stats.stats.type_url == "io.containerd.cgroups.v2.Metrics"
    assert (await svc.Pids(pb.PidsRequest(id="pod1"), None)).processes[0].pid == os.getpid()


def test_metrics_in_containerds_shape():
    stats = ContainerStats(
        cpu=CpuStats(usage_usec=10, user_usec=6, system_usec=4), pids=PidsStats(current=3, limit=100),
        memory=MemoryStats(usage=4096, limit=8192, stat={"anon": 1024, "file": 2048, "not_a_field": 1}),
        io=(IoDeviceStats(major=254, minor=0, rbytes=5),),
    )  # fmt: skip
    m = metrics(stats)
    assert isinstance(m, metrics_pb2.Metrics)
    assert (m.cpu.usage_usec, m.pids.current, m.pids.limit) == (10, 3, 100)
    assert (m.memory.usage, m.memory.usage_limit, m.memory.anon, m.memory.file) == (4096, 8192, 1024, 2048)
    assert m.io.usage[0].rbytes == 5


# -- rootfs mounts --------------------------------------------------------------------------------
def test_mount_options_split_into_flags_and_data():
    flags, data = rootfs.split_options(["ro", "nosuid", "index=off", "lowerdir=/a", "rw"])
    assert flags == 0x2 and data == "index=off,lowerdir=/a"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_rootfs_overlay_and_bind_mount_and_unmount(tmp_path):
    lower, upper, work, target = (tmp_path / n for n in ("lower", "upper", "work", "rootfs"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "hello").write_text("hi")
    opts = (f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}")
    assert rootfs.mount_rootfs([rootfs.RootfsMount("overlay", "overlay", opts)], target)
    assert rootfs.is_mounted(target) and (target / "hello").read_text() == "hi"
    rootfs.unmount_rootfs(target)
    assert not rootfs.is_mounted(target)
    assert rootfs.mount_rootfs([rootfs.RootfsMount("bind", str(lower), ("rbind", "ro"))], target)
    with pytest.raises(OSError):
        (target / "new").write_text("x")
    rootfs.unmount_rootfs(target)
    assert not rootfs.mount_rootfs([], target)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_rootfs_mount_failure_leaves_nothing_mounted(tmp_path):
    target = tmp_path / "rootfs"
    good = rootfs.RootfsMount("bind", str(tmp_path), ("rbind",))
    bad = rootfs.RootfsMount("overlay", "overlay", ("lowerdir=/does/not/exist",))
    with pytest.raises(Exception, match="mount rootfs"):
        rootfs.mount_rootfs([good, bad], target)
    assert not rootfs.is_mounted(target)
    with pytest.raises(InvalidArgument, match="type"):
        rootfs.mount_rootfs([rootfs.RootfsMount("", "x")], target)
    assert stat.S_ISDIR(target.stat().st_mode)


def test_pod_limits_from_annotations_or_resources():
    from cocoon.shim.tasks import pod_limits

    spec = {"linux": {"resources": {"memory": {"limit": 64 << 20}, "cpu": {"quota": 50000, "period": 100000}}}}
    assert pod_limits(spec) == (64 << 20, 50000, 100000)
    spec["annotations"] = {
        "io.kubernetes.cri.sandbox-memory": str(128 << 20),
        "io.kubernetes.cri.sandbox-cpu-quota": "x",
    }
    assert pod_limits(spec) == (128 << 20, 50000, 100000)
    assert pod_limits({}) == (0, 0, 0)
    assert pod_limits({"linux": {"resources": {"memory": {"limit": -1}}}}) == (0, 0, 0)
