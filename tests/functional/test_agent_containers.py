"""Containers through the agent API, end to end.

* ``test_containers_in_a_vm`` (``vm``): one boot of our image with a virtio-fs share of a busybox
  rootfs (virtiofsd on the host); every container RPC against real crun in the guest.
* ``test_containers_in_host_mode``: the same agent code serving on a unix socket on the host,
  driving the host's crun inside a private mount namespace (cgroup2 mounted there, crun's cgroup
  manager disabled: this host's cgroups are v1). Seconds instead of a boot; no cgroup features.
* ``test_virtiofsd_*``: the host's virtiofsd helper on its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cocoon.errors import AgentError, NotFound, ProcessError
from cocoon.oci.defaults import default_spec
from cocoon.protocol.agent_client import AgentClient
from cocoon.protocol.ttrpc import UnixTransport
from cocoon.protocol.types import Storage
from cocoon.storage.virtiofs import VirtioFsDaemon, daemon_argv

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "sleep", "ls", "id", "hostname", "stty", "tty", "head", "true")
SHARE_TAG = "cocoonshare"
GUEST_SHARE = "/run/cocoon/shared"


def make_rootfs(root: Path) -> Path:
    """A minimal busybox rootfs (static busybox from busybox-static)."""
    if not BUSYBOX.is_file() or b"statically linked" not in subprocess.run(
            ["file", "-L", str(BUSYBOX)], capture_output=True, check=False).stdout:
        pytest.skip("a static /bin/busybox is needed (Debian: busybox-static)")
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "data"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    return root


def spec(root: str, args: list[str], *, terminal: bool = False) -> dict:
    s = default_spec()
    s["root"] = {"path": root, "readonly": True}
    s["process"]["args"] = args
    s["process"]["terminal"] = terminal
    s["process"]["env"] = ["PATH=/bin", "TERM=xterm"]
    return s


def process(args: list[str], *, terminal: bool = False) -> dict:
    return {"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}, "terminal": terminal}


async def read_all(agent: AgentClient, cid: str, eid: str = "", *, stderr: bool = False) -> bytes:
    return await asyncio.wait_for(agent.read_all(cid, eid, stderr=stderr), 60)


async def wait(agent: AgentClient, cid: str, eid: str = "") -> int:
    return await agent.wait_process(cid, eid, timeout=60)


async def exercise(agent: AgentClient, root: str, timings: dict[str, float]) -> None:
    """The container scenario both tests run: init stdio, exec with stdin, signals, terminals."""
    # A container that prints on both streams and exits 3.
    t0 = time.monotonic()
    await agent.create_container("c1", spec(root, ["sh", "-c", "echo hello; echo err >&2; exit 3"]))
    timings["create"] = time.monotonic() - t0
    t1 = time.monotonic()
    await agent.start_container("c1")
    out, err = await asyncio.gather(read_all(agent, "c1"), read_all(agent, "c1", stderr=True))
    assert (out, err) == (b"hello\n", b"err\n")
    assert await wait(agent, "c1") == 3
    timings["start_to_exit"] = time.monotonic() - t1
    assert await wait(agent, "c1") == 3  # the init's status stays until the container is removed
    with pytest.raises(AgentError, match="already exited") as info:
        await agent.signal_process("c1", "", signal.SIGTERM)
    assert info.value.code == "NOT_FOUND"
    t2 = time.monotonic()
    await agent.remove_container("c1")
    timings["remove"] = time.monotonic() - t2
    with pytest.raises(AgentError) as info:
        await agent.wait_process("c1", "", timeout=5)
    assert info.value.code == "NOT_FOUND"

    # A long-running container and processes exec'd into it. Its uts namespace is a host path, as
    # for a pod's pause container: dropped in the guest, so it shares the VM's (the sandbox's).
    s2 = spec(root, ["sleep", "1000"])
    s2.pop("hostname", None)
    s2["linux"]["namespaces"] = [{"type": "uts", "path": "/proc/4242/ns/uts"} if n["type"] == "uts" else n
                                 for n in s2["linux"]["namespaces"]]
    await agent.create_container("c2", s2)
    await agent.start_container("c2")
    t3 = time.monotonic()
    await agent.exec_process("c2", "cat", process(["cat"]))
    timings["exec"] = time.monotonic() - t3
    payload = b"line one\n" + os.urandom(200_000) + b"\nlast line\n"

    async def feed() -> None:
        for i in range(0, len(payload), 65536):
            assert await agent.write_stdin("c2", "cat", payload[i:i + 65536]) == len(payload[i:i + 65536])
        await agent.close_stdin("c2", "cat")

    _, echoed = await asyncio.gather(feed(), read_all(agent, "c2", "cat"))
    assert echoed == payload
    assert await wait(agent, "c2", "cat") == 0
    with pytest.raises(AgentError, match="no such process"):  # waited for: forgotten
        await agent.wait_process("c2", "cat", timeout=5)

    await agent.exec_process("c2", "sleeper", process(["sleep", "1000"]))
    with pytest.raises(AgentError) as info:
        await agent.exec_process("c2", "sleeper", process(["true"]))
    assert info.value.code == "ALREADY_EXISTS"
    await agent.signal_process("c2", "sleeper", signal.SIGTERM)
    assert await wait(agent, "c2", "sleeper") == 143

    # Terminal exec: output through the pty, window size, input, ^D on close.
    await agent.exec_process("c2", "tty", process(["sh", "-c", "read line; stty size; echo got:$line"],
                                                  terminal=True))
    await agent.tty_win_resize("c2", "tty", 40, 100)
    await agent.write_stdin("c2", "tty", b"typed\n")
    out = await read_all(agent, "c2", "tty")
    assert b"40 100\r\n" in out and b"got:typed\r\n" in out
    assert await read_all(agent, "c2", "tty", stderr=True) == b""
    assert await wait(agent, "c2", "tty") == 0

    with pytest.raises(AgentError) as info:
        await agent.exec_process("c2", "bad", process(["/no/such/binary"]))
    assert "no/such/binary" in str(info.value)

    # A terminal container (process.terminal in config.json: crun's --console-socket at create).
    await agent.create_container("c3", spec(root, ["sh", "-c", "tty; echo tty-out"], terminal=True))
    await agent.start_container("c3")
    out = await read_all(agent, "c3")
    assert out.endswith(b"tty-out\r\n") and b"/dev/pts/" in out
    assert await wait(agent, "c3") == 0
    await agent.remove_container("c3")


@pytest.mark.vm
async def test_containers_in_a_vm(cfg, workdir, tmp_path, no_leaks) -> None:
    from cocoon.api.guest import GuestVM

    share = tmp_path / "share"
    make_rootfs(share / "rootfs")
    root = f"{GUEST_SHARE}/rootfs"
    timings: dict[str, float] = {}
    # Resolve the accelerator first: the KVM probe boot (accel.choose_accel) starts QEMU with the
    # spec's shared_dirs too and would take virtiofsd's only connection. Its result is cached.
    await GuestVM(cfg, "t-ctr", workdir).vm_spec()
    with VirtioFsDaemon(share, workdir / "vfs.sock", tag=SHARE_TAG) as shared:
        t0 = time.monotonic()
        async with GuestVM(cfg, "t-ctr", workdir, shared_dirs=(shared,)) as guest:
            timings["boot"] = time.monotonic() - t0
            agent: AgentClient = guest.agent
            details = await agent.guest_details()
            assert "containers" in details.capabilities
            await agent.create_sandbox(sandbox_id="t-ctr", hostname="ctrbox", dns=["10.0.0.53"], storages=[
                Storage(driver="virtio-fs", source=SHARE_TAG, mount_point=GUEST_SHARE)])
            with pytest.raises(AgentError, match="already created"):
                await agent.create_sandbox(sandbox_id="t-ctr")
            oom = asyncio.ensure_future(agent.get_oom_event())
            try:
                await _in_vm(agent, root, oom, timings)
            finally:
                oom.cancel()
            # c2 is left running: DestroySandbox (GuestVM.stop) kills and removes it.
            t2 = time.monotonic()
        timings["destroy_and_stop"] = time.monotonic() - t2
    print("timings:", {k: round(v, 3) for k, v in timings.items()})


async def _in_vm(agent: AgentClient, root: str, oom: asyncio.Future[str], timings: dict[str, float]) -> None:
    await exercise(agent, root, timings)

    # c2 still runs: cgroup features, container storages, pause/resume.
    stats = await agent.stats_container("c2")
    assert stats.pids.current >= 1 and stats.memory.usage > 0 and stats.cpu.usage_usec > 0
    await agent.update_container("c2", {"pids": {"limit": 50}})
    assert (await agent.stats_container("c2")).pids.limit == 50
    await agent.pause_container("c2")
    with pytest.raises(AgentError, match="not running"):
        await agent.exec_process("c2", "frozen", process(["true"]))
    await agent.resume_container("c2")
    await agent.exec_process("c2", "uts", process(["hostname"]))
    assert await read_all(agent, "c2", "uts") == b"ctrbox\n"  # the VM's uts namespace (CreateSandbox)
    assert await wait(agent, "c2", "uts") == 0

    # A container with its own tmpfs storage, bind-mounted at /data, and a memory limit
    # it exceeds: the OOM kill is reported.
    s4 = spec(root, ["sh", "-c", "echo stored > /data/f; cat /data/f; sleep 1000"])
    s4["mounts"].append({"destination": "/data", "type": "bind", "source": "/run/cocoon/storage/c4",
                         "options": ["rbind", "rw"]})
    s4["linux"]["resources"] = {"memory": {"limit": 16 << 20}}
    await agent.create_container("c4", s4, storages=[
        Storage(driver="tmpfs", source="tmpfs", mount_point="/run/cocoon/storage/c4", options=("size=1m",))])
    await agent.start_container("c4")
    assert await agent.read_stdout("c4", "", timeout=60) == b"stored\n"
    await agent.exec_process("c4", "hog", process(["sh", "-c", "x=a; while true; do x=$x$x; done"]))
    assert await asyncio.wait_for(oom, 60) == "c4"
    assert await wait(agent, "c4", "hog") == 137

    t1 = time.monotonic()
    await agent.remove_container("c4")
    timings["remove_running"] = time.monotonic() - t1


# ---- host mode

_HOST_AGENT = """
import asyncio, signal, sys
from cocoon import log
from cocoon.agent.containers import ManagerConfig
from cocoon.agent.crun import CrunConfig
from cocoon.agent.service import AgentServer

log.setup(level="debug", fmt="logfmt", stream=sys.stderr)
run_dir, sock = sys.argv[1], sys.argv[2]
cfg = ManagerConfig(run_dir=run_dir, in_guest=False,
                    crun=CrunConfig(root=run_dir + "/crun", extra_args=("--cgroup-manager=disabled",)))

async def main():
    server = AgentServer(in_guest=False, manager=cfg)
    # SIGTERM: remove every container (they outlive a killed agent), then exit.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.request_shutdown)
    await server.serve_unix(sock)

asyncio.run(main())
"""


@pytest.fixture
def host_agent(tmp_path):
    """The agent in host mode, in a mount namespace whose /sys/fs/cgroup is cgroup2 (crun needs it)."""
    if os.geteuid() != 0 or not shutil.which("crun") or not shutil.which("unshare"):
        pytest.skip("needs root, crun and unshare")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace: {probe.stderr.decode().strip()}")
    script = tmp_path / "agent.py"
    script.write_text(_HOST_AGENT)
    sock = tmp_path / "agent.sock"
    log_path = tmp_path / "agent.log"
    shell = ('umount -R /sys/fs/cgroup 2>/dev/null; mount -t cgroup2 none /sys/fs/cgroup || exit 97; '
             'exec "$@"')
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", shell, "sh", sys.executable, str(script), str(tmp_path / "run"), str(sock)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")})
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None:
                pytest.skip(f"host-mode agent did not start: {log_path.read_text()[-500:]}")
            assert time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.02)
        yield sock, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # unshare and sh exec'd: this is the agent
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.returncode not in (0, -signal.SIGKILL):
            print(log_path.read_text()[-3000:])


async def test_containers_in_host_mode(host_agent, tmp_path) -> None:
    sock, proc = host_agent
    root = make_rootfs(tmp_path / "rootfs")
    timings: dict[str, float] = {}
    agent = await AgentClient.connect(UnixTransport(sock), timeout=30)
    try:
        await exercise(agent, str(root), timings)
        with pytest.raises(AgentError) as info:  # storages are a guest thing
            await agent.create_sandbox(storages=[Storage(driver="tmpfs", mount_point="/run/x")])
        assert info.value.code == "FAILED_PRECONDITION"
        # c2 still runs: DestroySandbox removes it and stops the agent.
        await agent.destroy_sandbox(timeout=30)
    finally:
        await agent.close()
    for _ in range(500):
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.02)
    assert proc.returncode == 0
    assert not (tmp_path / "run" / "containers" / "c2").exists()
    print("timings:", {k: round(v, 3) for k, v in timings.items()})


# ---- virtiofsd


def test_virtiofsd_argv() -> None:
    argv = daemon_argv("/usr/lib/qemu/virtiofsd", Path("/srv/share"), Path("/run/vfs.sock"))
    assert argv == ["/usr/lib/qemu/virtiofsd", "--socket-path=/run/vfs.sock", "-o", "source=/srv/share",
                    "-o", "cache=auto", "-o", "sandbox=namespace", "--rlimit-nofile=0"]


def test_virtiofsd_start_stop_leaves_nothing(tmp_path, no_leaks) -> None:
    daemon = VirtioFsDaemon(tmp_path, tmp_path / "v.sock", tag="t")
    if not Path(daemon.binary).is_file():
        pytest.skip("virtiofsd not installed (qemu-system-common)")
    with daemon as shared:
        assert shared.tag == "t" and shared.socket.exists()
        pid = daemon.pid
        assert pid is not None and Path(f"/proc/{pid}").exists()
    assert not (tmp_path / "v.sock").exists()
    assert not Path(f"/proc/{pid}").exists()


def test_virtiofsd_errors(tmp_path, no_leaks) -> None:
    with pytest.raises(NotFound, match="shared directory"), VirtioFsDaemon(tmp_path / "missing", tmp_path / "s.sock"):
        pass
    with pytest.raises(NotFound, match="virtiofsd not found"), \
            VirtioFsDaemon(tmp_path, tmp_path / "s.sock", binary="/nonexistent/virtiofsd"):
        pass
    with pytest.raises(ProcessError, match="exited before listening"), \
            VirtioFsDaemon(tmp_path, tmp_path / "s.sock", binary="/bin/false"):
        pass
    assert not (tmp_path / "s.sock").exists()
