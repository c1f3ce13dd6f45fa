"""The pod sandbox library API (cocoon.api.sandbox): one VM, several containers, driven in-process.

One boot carries the whole life cycle (VM boots are 4-8 s under TCG); failures that need no
guest (bad ids, missing rootfs, a VMM that cannot start, mounts made after virtiofsd started)
are checked without a boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from cocoon.api.bundle import make_bundle
from cocoon.api.pod_share import PodShare
from cocoon.api.sandbox import Sandbox, SandboxState
from cocoon.api.state import Status
from cocoon.errors import AgentError, AlreadyExists, CocoonError, InvalidArgument, NotFound, StateError
from cocoon.oci.spec import Spec, load
from cocoon.storage.shared import mounts_below
from cocoon.storage.virtiofs import VirtioFsDaemon

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts and virtiofsd need root")


def qemu_pids(sandbox_id: str) -> list[int]:
    """QEMU processes whose command line names the sandbox (``-name cocoon-<id>,...``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"qemu-system" in argv[0] and f"cocoon-{sandbox_id},".encode() in b" ".join(argv):
            found.append(int(entry.name))
    return found


def bundle_with_volume(directory: Path, args: list[str], volume: Path | None = None) -> Spec:
    bundle = make_bundle(directory, args)
    if volume is not None:
        raw = json.loads((bundle / "config.json").read_text())
        raw["mounts"].append({"destination": "/data", "type": "bind", "source": str(volume),
                              "options": ["rbind", "ro"]})  # fmt: skip
        (bundle / "config.json").write_text(json.dumps(raw))
    return load(bundle)


def assert_nothing_left(state_dir: Path) -> None:
    assert not mounts_below(state_dir), mounts_below(state_dir)
    assert not (state_dir / "shared").exists()
    assert not list(state_dir.glob("*.sock"))


@pytest.mark.vm
@needs_root
async def test_two_containers_one_vm(cfg, no_leaks, tmp_path):
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "f").write_text("from the host\n")
    short = bundle_with_volume(tmp_path / "a", ["sh", "-c", "echo out-a; echo err-a >&2; uname -r; exit 3"])
    server = bundle_with_volume(tmp_path / "b", ["sh", "-c", "echo ready; exec sleep 600"], volume)
    no_such_binary = bundle_with_volume(tmp_path / "c", ["/bin/no-such-binary"])
    state_dir = tmp_path / "sb"
    sid = f"api-{os.getpid()}"
    sb = Sandbox(cfg, sid, state_dir, hostname="pod-api")
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    async with sb:
        timings["start"] = time.monotonic() - t0
        assert sb.state is SandboxState.RUNNING
        assert len(qemu_pids(sid)) == 1

        # Refusals that leave nothing behind (no second boot needed).
        with pytest.raises(InvalidArgument):
            await sb.create_container("bad/id", short)
        with pytest.raises(NotFound, match="rootfs"):
            await sb.create_container("c", dataclasses.replace(short, root=dataclasses.replace(
                short.root, path=tmp_path / "missing")))  # fmt: skip
        with pytest.raises(AgentError, match="no-such-binary") as failed:
            await sb.create_container("c", no_such_binary)
        assert failed.value.context["sandbox"] == sid and failed.value.context["container"] == "c"
        assert os.listdir(sb.share_dir) == [] and mounts_below(sb.share_dir) == [str(sb.share_dir)]

        t = time.monotonic()
        a = await sb.create_container("a", short)
        b = await sb.create_container("b", server)
        timings["create 2"] = time.monotonic() - t
        assert set(sb.containers) == {"a", "b"} and a.state is Status.CREATED
        with pytest.raises(AlreadyExists):
            await sb.create_container("a", short)
        t = time.monotonic()
        await a.start()
        await b.start()
        timings["start 2"] = time.monotonic() - t

        out, err, status = await a.init.output()
        assert out.startswith(b"out-a\n") and out.strip().endswith(b"amd64")
        assert (err, status) == (b"err-a\n", 3)
        assert a.state is Status.STOPPED and a.exit_status == 3
        assert await a.init.wait() == 3  # asked again: kept
        with pytest.raises(StateError):
            await a.start()

        assert await b.init.read_stdout() == b"ready\n"
        t = time.monotonic()
        probe = await b.exec("probe", {"args": ["sh", "-c", "cat /data/f; hostname; echo x > /data/g"], "cwd": "/"})
        out, err, status = await probe.output()
        timings["exec"] = time.monotonic() - t
        # The volume was bind-mounted after virtiofsd started: visible, and read-only there too.
        assert out.startswith(b"from the host\n") and b"Read-only file system" in err and status != 0
        assert not (volume / "g").exists()

        sleeper = await b.exec("sleeper", {"args": ["sleep", "100"], "cwd": "/"})
        with pytest.raises(AlreadyExists):
            await b.exec("sleeper", {"args": ["true"], "cwd": "/"})
        with pytest.raises(InvalidArgument, match="args"):
            await b.exec("x", {"args": [], "cwd": "/"})
        await sleeper.signal(signal.SIGKILL)
        assert (await sleeper.output())[2] == 137
        assert "sleeper" not in b.execs  # collected: the id is free again

        stats = await b.stats()
        assert stats.pids.current >= 1 and stats.memory.usage > 0
        await b.update({"pids": {"limit": 64}})
        assert (await b.stats()).pids.limit == 64

        await b.pause()
        assert b.state is Status.PAUSED
        with pytest.raises(StateError):
            await b.exec("while-paused", {"args": ["true"], "cwd": "/"})
        await b.resume()
        assert b.state is Status.RUNNING

        t = time.monotonic()
        await a.remove()
        timings["remove"] = time.monotonic() - t
        assert a.removed and set(sb.containers) == {"b"}
        assert not (sb.share_dir / "a").exists() and mounts_below(sb.share_dir / "a") == []
        await a.remove()  # idempotent
        with pytest.raises(StateError, match="removed"):
            await a.stats()
        out, _, status = await (await b.exec("after", {"args": ["echo", "still here"], "cwd": "/"})).output()
        assert (out, status) == (b"still here\n", 0)

        b_exit = asyncio.create_task(b.init.wait())
        t = time.monotonic()
    timings["stop"] = time.monotonic() - t
    print("timings:", {k: round(v, 2) for k, v in timings.items()})

    assert sb.state is SandboxState.STOPPED and b.removed and b.state is Status.STOPPED
    with contextlib.suppress(AgentError):  # the guest may power off before answering
        assert await asyncio.wait_for(b_exit, 5) == 137  # killed by DestroySandbox
    assert qemu_pids(sid) == []
    assert_nothing_left(state_dir)
    with pytest.raises(StateError, match="stopped"):
        await sb.create_container("late", short)
    with pytest.raises(StateError):
        await sb.start()
    await sb.stop()  # idempotent


@pytest.mark.vm
@needs_root
async def test_failed_start_leaves_nothing(cfg, no_leaks, tmp_path):
    q = dataclasses.replace(cfg.hypervisor.qemu, path=str(tmp_path / "no-qemu"), accel="tcg")
    broken = dataclasses.replace(cfg, hypervisor=dataclasses.replace(cfg.hypervisor, qemu=q))
    sb = Sandbox(broken, "broken", tmp_path / "sb")
    with pytest.raises(CocoonError) as failed:
        await sb.start()
    assert failed.value.context.get("sandbox") == "broken"
    assert sb.state is SandboxState.STOPPED
    assert_nothing_left(tmp_path / "sb")
    await sb.stop()


@needs_root
def test_late_binds_reach_virtiofsd_read_only(tmp_path, no_leaks):
    """No VM: what virtiofsd's own mount namespace sees of binds added after it started."""
    if not Path("/usr/lib/qemu/virtiofsd").exists() or shutil.which("pgrep") is None:
        pytest.skip("virtiofsd (qemu-system-common) and pgrep are needed")
    volume = tmp_path / "vol"
    volume.mkdir()
    spec = bundle_with_volume(tmp_path / "b", ["true"], volume)
    share = PodShare(tmp_path / "shared")
    with share as root, VirtioFsDaemon(root, tmp_path / "vfs.sock"), socket.socket(socket.AF_UNIX) as vmm:
        vmm.connect(str(tmp_path / "vfs.sock"))  # virtiofsd makes its namespace once the VMM connects
        child = None
        deadline = time.monotonic() + 5
        while child is None and time.monotonic() < deadline:
            pids = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_child_of_vfs(p, tmp_path)]
            child = pids[0] if pids else None
            time.sleep(0.02)
        assert child is not None, "virtiofsd's sandbox process not found"
        plan = share.add(spec, "c1")
        seen = {line.split()[4]: line.split()[5] for line in (child / "mountinfo").read_text().splitlines()}
        n = len(plan.guest_spec["mounts"]) - 1
        assert seen.get("/c1/rootfs", "").startswith("rw") and seen.get(f"/c1/mounts/{n}", "").startswith("ro")
        share.remove("c1")
        assert "/c1/" not in (child / "mountinfo").read_text()
        assert os.listdir(root) == []
    assert not mounts_below(tmp_path) and not (tmp_path / "shared").exists()


def _is_child_of_vfs(proc: Path, marker: Path) -> bool:
    try:
        argv = (proc / "cmdline").read_bytes()
        stat = (proc / "stat").read_text()
    except OSError:
        return False
    # virtiofsd's sandboxed child has the same command line and a virtiofsd parent.
    if b"virtiofsd" not in argv or str(marker).encode() not in argv:
        return False
    parent = stat.rsplit(")", 1)[1].split()[1]
    try:
        return b"virtiofsd" in Path(f"/proc/{parent}/cmdline").read_bytes()
    except OSError:
        return False


@needs_root
def test_clean_up_after_a_dead_owner(tmp_path):
    """A sandbox whose owner was SIGKILLed leaves its bind mounts: clean_up undoes them, and only them."""
    from cocoon.api.sandbox import clean_up

    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "f").write_text("keep me\n")
    spec = bundle_with_volume(tmp_path / "b", ["true"], volume)
    state_dir = tmp_path / "sb"
    state_dir.mkdir()
    share = PodShare(state_dir / "shared")
    share.open()
    share.add(spec, "c1")
    (state_dir / "agent.sock").touch()
    assert len(mounts_below(state_dir)) == 3  # the share root, the rootfs, the volume
    # The owner "dies" here: nothing closes the share.
    assert clean_up(state_dir)
    assert_nothing_left(state_dir)
    assert (volume / "f").read_text() == "keep me\n" and (tmp_path / "b" / "rootfs" / "bin" / "sh").exists()
