"""Pure parts of the pod sandbox API: life cycles, guards, error translation, wait caching (no VM)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from cocoon import config
from cocoon.api.pod_container import Container, agent_errors
from cocoon.api.sandbox import Sandbox, SandboxState, pod_vm_size
from cocoon.api.state import Status
from cocoon.errors import (
    AgentError,
    AgentTimeout,
    AlreadyExists,
    CocoonError,
    InvalidArgument,
    NotFound,
    StateError,
)
from cocoon.oci.spec import default_spec, parse

S = SandboxState


@pytest.fixture
def cfg() -> config.Config:
    q = dataclasses.replace(config.Config().hypervisor.qemu, memory_mib=256, vcpus=1)
    return dataclasses.replace(config.Config(), hypervisor=dataclasses.replace(config.Config().hypervisor, qemu=q))


# -- SandboxState ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst"),
    [(S.NEW, S.STARTING), (S.NEW, S.STOPPED), (S.STARTING, S.RUNNING), (S.STARTING, S.STOPPED),
     (S.RUNNING, S.STOPPING), (S.STOPPING, S.STOPPED)],
)  # fmt: skip
def test_sandbox_transitions_allowed(src, dst):
    assert src.transition(dst) is dst


@pytest.mark.parametrize(
    ("src", "dst"),
    [(S.STOPPED, S.STARTING), (S.RUNNING, S.STARTING), (S.RUNNING, S.STOPPED), (S.NEW, S.RUNNING),
     (S.STOPPED, S.RUNNING), (S.STOPPING, S.RUNNING)],
)  # fmt: skip
def test_sandbox_transitions_refused(src, dst):
    with pytest.raises(StateError) as err:
        src.transition(dst, sandbox="sb1")
    assert err.value.context["sandbox"] == "sb1" and err.value.context["state"] == str(src)
    assert err.value.context["required"]


def test_every_state_can_end_stopped():
    def allowed(src: SandboxState) -> set[SandboxState]:
        out = set()
        for dst in S:
            with contextlib.suppress(StateError):
                out.add(src.transition(dst))
        return out

    for state in S:
        seen, todo = {state}, [state]
        while todo:
            for nxt in allowed(todo.pop()) - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert S.STOPPED in seen


def test_require_running():
    S.RUNNING.require_running("create container")
    with pytest.raises(StateError, match="cannot exec: the sandbox is stopped") as err:
        S.STOPPED.require_running("exec", sandbox="sb", container="c")
    assert err.value.context == {"sandbox": "sb", "state": "stopped", "required": "running", "container": "c"}


# -- sizing and construction ----------------------------------------------------------------------


def test_pod_vm_size(cfg):
    assert pod_vm_size(cfg) == (256, 1)
    assert pod_vm_size(cfg, memory_limit_bytes=(128 << 20) + 1) == (256 + 129, 1)
    assert pod_vm_size(cfg, cpu_quota=150000, cpu_period=100000)[1] == min(2, __import__("os").cpu_count() or 1)
    assert pod_vm_size(cfg, memory_limit_bytes=-1, cpu_quota=-1, cpu_period=100000) == (256, 1)


def test_sandbox_arguments_checked(cfg, tmp_path):
    with pytest.raises(InvalidArgument, match="sandbox id"):
        Sandbox(cfg, "../x", tmp_path)
    with pytest.raises(InvalidArgument, match="too long"):
        Sandbox(cfg, "sb", tmp_path / ("d" * 120))
    with pytest.raises(InvalidArgument):
        Sandbox(cfg, "sb", tmp_path, memory_mib=-1)
    sb = Sandbox(cfg, "sb", tmp_path, vcpus=2)
    assert (sb.memory_mib, sb.vcpus, sb.hostname, sb.state) == (256, 2, "sb", S.NEW)


async def test_sandbox_stop_before_start_and_no_restart(cfg, tmp_path):
    sb = Sandbox(cfg, "sb", tmp_path)
    with pytest.raises(StateError, match="sandbox is new"):
        await sb.create_container("c", _spec(tmp_path))
    await sb.stop()
    await sb.stop()
    assert sb.state is S.STOPPED
    with pytest.raises(StateError, match="from stopped to starting"):
        await sb.start()
    with pytest.raises(NotFound):
        sb.container("c")


# -- error translation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [("NOT_FOUND", NotFound), ("ALREADY_EXISTS", AlreadyExists), ("INVALID_ARGUMENT", InvalidArgument),
     ("FAILED_PRECONDITION", StateError), ("INTERNAL", AgentError)],
)  # fmt: skip
def test_agent_errors_typed_with_context(code, cls):
    with pytest.raises(cls) as err, agent_errors("start container", sandbox="sb", container="c", exec_id=None):
        raise AgentError("agent AgentService/StartContainer: boom", method="AgentService/StartContainer", code=code)
    expected = "start container: agent AgentService/StartContainer: boom (sandbox=sb, container=c"
    assert str(err.value).startswith(expected)
    assert err.value.context["code"] == code and "exec_id" not in err.value.context
    assert isinstance(err.value.__cause__, AgentError)


def test_agent_errors_keeps_timeouts_and_other_errors():
    with pytest.raises(AgentTimeout), agent_errors("exec process", sandbox="sb"):
        raise AgentTimeout("no answer in time", timeout=1.0)
    original = NotFound("rootfs missing", path="/x")
    with pytest.raises(NotFound) as err, agent_errors("create container", container="c"):
        raise original
    assert err.value is original and err.value.context == {"path": "/x", "container": "c"}


# -- containers and processes against a fake agent ------------------------------------------------


class FakeAgent:
    """Records calls; processes exit when told; output is queued per (container, exec id, stream)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.output: dict[tuple[str, str, str], list[bytes]] = {}
        self.exits: dict[tuple[str, str], asyncio.Future[int]] = {}
        self.fail: dict[str, CocoonError] = {}

    def _exit(self, cid: str, eid: str) -> asyncio.Future[int]:
        return self.exits.setdefault((cid, eid), asyncio.get_running_loop().create_future())

    async def _op(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail.pop(name)

    async def start_container(self, cid: str) -> None:
        await self._op("start", cid)

    async def pause_container(self, cid: str) -> None:
        await self._op("pause", cid)

    async def resume_container(self, cid: str) -> None:
        await self._op("resume", cid)

    async def exec_process(self, cid: str, eid: str, process: Any) -> None:
        await self._op("exec", cid, eid)

    async def signal_process(self, cid: str, eid: str, sig: int, *, all_processes: bool = False) -> None:
        await self._op("signal", cid, eid, sig, all_processes)

    async def remove_container(self, cid: str, *, wait: int = 0, timeout: float | None = None) -> None:
        await asyncio.sleep(0)  # a round trip: tasks started before (the init's wait) get going
        await self._op("remove", cid)
        for (c, _), fut in self.exits.items():
            if c == cid and not fut.done():
                fut.set_result(137)

    async def update_container(self, cid: str, resources: Any) -> None:
        await self._op("update", cid, resources)

    async def close_stdin(self, cid: str, eid: str) -> None:
        await self._op("close_stdin", cid, eid)

    async def write_stdin(self, cid: str, eid: str, data: bytes) -> int:
        await self._op("write_stdin", cid, eid, data)
        return len(data)

    async def read_stdout(self, cid: str, eid: str, n: int) -> bytes:
        chunks = self.output.get((cid, eid, "out"), [])
        return chunks.pop(0) if chunks else b""

    async def read_stderr(self, cid: str, eid: str, n: int) -> bytes:
        chunks = self.output.get((cid, eid, "err"), [])
        return chunks.pop(0) if chunks else b""

    async def wait_process(self, cid: str, eid: str = "") -> int:
        self.calls.append(("wait", (cid, eid)))
        return await asyncio.shield(self._exit(cid, eid))


def _spec(tmp_path: Path) -> Any:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    raw = default_spec()
    raw["root"] = {"path": "rootfs"}
    return parse(raw, bundle=tmp_path, source="config.json")


@pytest.fixture
async def running(cfg, tmp_path):
    """A sandbox that believes it runs, with a fake agent, and one created container ``c``."""
    sb = Sandbox(cfg, "sb", tmp_path / "sb")
    agent = FakeAgent()
    sb._state, sb._agent = S.RUNNING, agent  # type: ignore[assignment]
    container = Container(sb, "c", _spec(tmp_path))
    sb._containers["c"] = container
    yield sb, agent, container
    for task in list(sb._tasks):
        task.cancel()


async def test_container_life_cycle_guards(running):
    _, agent, c = running
    assert c.state is Status.CREATED
    with pytest.raises(StateError, match="cannot pause container: it is created") as err:
        await c.pause()
    assert err.value.context["sandbox"] == "sb" and err.value.context["container"] == "c"
    await c.start()
    assert c.state is Status.RUNNING
    with pytest.raises(StateError):
        await c.start()
    await c.pause()
    assert c.state is Status.PAUSED
    with pytest.raises(StateError):
        await c.exec("e1", {"args": ["true"], "cwd": "/"})
    await c.resume()
    await c.signal(15, all=True)
    assert ("signal", ("c", "", 15, True)) in agent.calls
    agent._exit("c", "").set_result(0)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert c.state is Status.STOPPED and c.exit_status == 0
    with pytest.raises(StateError):
        await c.signal(9)
    with pytest.raises(StateError, match="stopped"):
        await c.update({"pids": {"limit": 1}})


async def test_failed_start_keeps_state(running):
    _, agent, c = running
    agent.fail["start"] = AgentError("agent AgentService/StartContainer: crun start: no", code="INTERNAL")
    with pytest.raises(AgentError, match=r"^start container: ") as err:
        await c.start()
    assert err.value.context["container"] == "c"
    assert c.state is Status.CREATED


async def test_exec_ids_and_wait_caching(running):
    _, agent, c = running
    await c.start()
    with pytest.raises(InvalidArgument, match="exec id"):
        await c.exec("a/b", {"args": ["true"], "cwd": "/"})
    with pytest.raises(InvalidArgument, match="args"):
        await c.exec("e1", {"cwd": "/"})
    p = await c.exec("e1", {"args": ["true"], "cwd": "/"})
    assert (p.container_id, p.exec_id, p.sandbox_id, p.is_init) == ("c", "e1", "sb", False)
    with pytest.raises(AlreadyExists):
        await c.exec("e1", {"args": ["true"], "cwd": "/"})
    waiters = [asyncio.create_task(p.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()  # one caller giving up does not cancel the others
    agent._exit("c", "e1").set_result(143)
    assert await asyncio.gather(*waiters[1:]) == [143, 143]
    assert await p.wait() == 143 and p.exit_status == 143
    assert sum(1 for name, args in agent.calls if name == "wait" and args == ("c", "e1")) == 1
    assert "e1" not in c.execs
    agent.exits.pop(("c", "e1"))
    await c.exec("e1", {"args": ["true"], "cwd": "/"})  # the id is free again


async def test_output_reads_both_streams_then_waits(running):
    _, agent, c = running
    await c.start()
    p = await c.exec("e1", {"args": ["cat"], "cwd": "/"})
    agent.output[("c", "e1", "out")] = [b"he", b"llo"]
    agent.output[("c", "e1", "err")] = [b"oops"]
    agent._exit("c", "e1").set_result(2)
    assert await p.output(b"in") == (b"hello", b"oops", 2)
    assert ("write_stdin", ("c", "e1", b"in")) in agent.calls and ("close_stdin", ("c", "e1")) in agent.calls
    await p.close_stdin()  # a second close is a no-op
    assert sum(1 for name, _ in agent.calls if name == "close_stdin") == 1


async def test_remove_is_idempotent_and_final(running):
    sb, agent, c = running
    await c.start()
    init_wait = asyncio.create_task(c.init.wait())
    await c.remove()
    await c.remove()
    assert [name for name, _ in agent.calls].count("remove") == 1
    assert c.removed and c.state is Status.STOPPED and "c" not in sb.containers
    assert await init_wait == 137
    for call in (c.stats(), c.start(), c.exec("e", {"args": ["true"], "cwd": "/"}), c.init.read_stdout()):
        with pytest.raises(StateError, match="removed"):
            await call


async def test_remove_tolerates_a_container_already_gone(running):
    _, agent, c = running
    agent.fail["remove"] = AgentError("agent AgentService/RemoveContainer: no such container", code="NOT_FOUND")
    await c.remove()
    assert c.removed


async def test_calls_refused_once_the_sandbox_stopped(running):
    sb, _, c = running
    sb._state = S.STOPPED
    with pytest.raises(StateError, match="sandbox is stopped") as err:
        await c.init.read_stdout()
    assert err.value.context["container"] == "c"
    await c.remove()  # nothing to ask the guest: just forgotten
    assert c.removed


# -- clean-up after a dead owner (no mounts here: the layout only) --------------------------------


def test_clean_up_removes_only_the_layout(tmp_path):
    from cocoon.api.sandbox import clean_up

    share = tmp_path / "shared"
    (share / "c1" / "rootfs").mkdir(parents=True)
    (share / "c1" / "mounts" / "0").mkdir(parents=True)
    (share / "c1" / "mounts" / "1").touch()
    (share / "c2" / "rootfs").mkdir(parents=True)
    (tmp_path / "agent.sock").touch()
    (tmp_path / "console.log").write_text("kept")
    assert clean_up(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console.log"]
    assert clean_up(tmp_path)  # idempotent


def test_clean_up_keeps_what_is_not_a_placeholder(tmp_path):
    from cocoon.api.sandbox import clean_up

    rootfs = tmp_path / "shared" / "c1" / "rootfs"
    rootfs.mkdir(parents=True)
    (rootfs / "data").write_text("a container's file: never removed")
    assert not clean_up(tmp_path)
    assert (rootfs / "data").read_text().startswith("a container's")


async def test_start_refuses_a_state_dir_holding_a_share(cfg, tmp_path):
    (tmp_path / "shared").mkdir()
    sb = Sandbox(cfg, "sb", tmp_path)
    with pytest.raises(AlreadyExists, match="clean_up") as err:
        await sb.start()
    assert err.value.context["sandbox"] == "sb" and sb.state is S.STOPPED
    assert (tmp_path / "shared").is_dir()  # not ours: left alone
