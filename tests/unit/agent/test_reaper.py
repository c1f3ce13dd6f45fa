"""The agent's reaper with real child processes on the host: statuses, early exits, orphans, run()."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from cocoon.agent.reaper import Reaper, shell_status
from cocoon.errors import NotFound, ProcessError, StateError


@pytest.fixture
async def reaper():
    r = Reaper()
    r.install()
    yield r
    r.close()


def test_shell_status() -> None:
    assert shell_status(0) == 0
    assert shell_status(3 << 8) == 3
    assert shell_status(signal.SIGKILL) == 137
    assert shell_status(signal.SIGTERM) == 143


async def test_exit_codes_and_signal_deaths(reaper: Reaper) -> None:
    ok = reaper.spawn(["sh", "-c", "exit 0"])
    three = reaper.spawn(["sh", "-c", "exit 3"])
    killed = reaper.spawn(["sleep", "30"])
    os.kill(killed, signal.SIGTERM)
    assert await reaper.wait(ok, timeout=10) == 0
    assert await reaper.wait(three, timeout=10) == 3
    assert await reaper.wait(killed, timeout=10) == 143


async def test_many_children_at_once(reaper: Reaper) -> None:
    # SIGCHLD coalesces: one signal for many exits must still reap them all.
    pids = [reaper.spawn(["sh", "-c", f"exit {i}"]) for i in range(20)]
    statuses = await asyncio.wait_for(asyncio.gather(*(reaper.wait(p) for p in pids)), 20)
    assert statuses == list(range(20))


async def test_status_of_a_pid_nobody_waited_for_is_kept(reaper: Reaper) -> None:
    # A grandchild orphaned to us (as crun's container process is to PID 1 in the guest).
    r = Reaper()
    reaper.close()
    r.install(subreaper=True)
    try:
        status, out, _ = await r.run(["sh", "-c", "sh -c 'exit 7' & echo $!"], timeout=10)
        assert status == 0
        orphan = int(out.decode().strip())
        for _ in range(1000):  # until the orphan was reaped, before anyone asked for it (10 s: CI is busy)
            r.reap()
            if orphan in r._statuses:
                break
            await asyncio.sleep(0.01)
        assert await r.wait(orphan, timeout=5) == 7
    finally:
        r.close()
        reaper.install()


async def test_wait_timeout_keeps_watching(reaper: Reaper) -> None:
    pid = reaper.spawn(["sleep", "30"])
    with pytest.raises(TimeoutError):
        await reaper.wait(pid, timeout=0.05)
    os.kill(pid, signal.SIGKILL)
    assert await reaper.wait(pid, timeout=10) == 137


async def test_spawn_dup2_env_cwd(reaper: Reaper, tmp_path) -> None:
    r, w = os.pipe()
    try:
        pid = reaper.spawn(["sh", "-c", 'echo "$FOO:$(pwd)"; echo err >&2'], stdout=w, stderr=w,
                           env={"PATH": os.environ["PATH"], "FOO": "bar"}, cwd=str(tmp_path))
        os.close(w)
        w = -1
        assert await reaper.wait(pid, timeout=10) == 0
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert data.decode().splitlines() == [f"bar:{tmp_path}", "err"]


async def test_child_gets_default_sigpipe(reaper: Reaper) -> None:
    # Python ignores SIGPIPE; a spawned command must not inherit that (yes | head would spin).
    status, out, _ = await reaper.run(["sh", "-c", "yes | head -n 2"], timeout=10)
    assert status == 0
    assert out == b"y\ny\n"


async def test_run_captures_and_feeds_input(reaper: Reaper) -> None:
    status, out, err = await reaper.run(["sh", "-c", "cat; echo oops >&2; exit 5"], input=b"x" * 200_000,
                                        timeout=10)
    assert status == 5
    assert out == b"x" * 200_000
    assert err == b"oops\n"


async def test_run_large_output_does_not_deadlock(reaper: Reaper) -> None:
    status, out, _ = await reaper.run(["sh", "-c", "head -c 1000000 /dev/zero"], timeout=10)
    assert status == 0 and len(out) == 1_000_000


async def test_run_does_not_wait_for_a_descendant_holding_the_pipe(reaper: Reaper) -> None:
    # crun create leaves the container holding its stdio: run() returns at crun's exit.
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, out, _ = await reaper.run(["sh", "-c", "echo started; sleep 5 & exit 0"], timeout=10)
    assert status == 0 and out == b"started\n"
    assert loop.time() - t0 < 3


async def test_run_timeout_kills(reaper: Reaper) -> None:
    with pytest.raises(ProcessError, match="timed out"):
        await reaper.run(["sleep", "30"], timeout=0.2)


async def test_missing_command(reaper: Reaper) -> None:
    with pytest.raises(NotFound):
        reaper.spawn(["/nonexistent/binary"])
    with pytest.raises(NotFound):
        reaper.spawn(["no-such-command-anywhere"])
    with pytest.raises(ProcessError, match="working directory"):
        reaper.spawn(["true"], cwd="/nonexistent/dir")


async def test_not_installed_and_close() -> None:
    r = Reaper()
    with pytest.raises(StateError):
        r.spawn(["true"])
    r.install()
    with pytest.raises(StateError):
        r.install()
    pid = r.spawn([sys.executable, "-c", "import time; time.sleep(30)"])
    fut = r.watch(pid)
    r.close()
    with pytest.raises(StateError):
        await fut
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
