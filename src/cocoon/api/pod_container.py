"""Containers and processes of a pod sandbox (:mod:`cocoon.api.sandbox`): the handles a caller holds.

A :class:`Container` is made by :meth:`cocoon.api.sandbox.Sandbox.create_container`; its
:attr:`Container.init` and every :meth:`Container.exec` give a :class:`Process`. Each method is one
agent call (or a few), with the container's state checked first and errors that name the sandbox,
the container and the exec id. See docs/api.md for the semantics (exit statuses, end of stream,
exec ids, life cycle).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from cocoon.api.ids import validate_id
from cocoon.api.state import Status
from cocoon.errors import AgentError, AlreadyExists, CocoonError, InvalidArgument, NotFound, StateError
from cocoon.log import get_logger
from cocoon.oci.model import Spec
from cocoon.protocol.types import ContainerStats

if TYPE_CHECKING:
    from cocoon.api.sandbox import Sandbox
    from cocoon.protocol.agent_client import AgentClient

log = get_logger("api")

#: Seconds the guest waits for a removed container's processes to die (SIGKILL was sent).
REMOVE_WAIT = 10
#: Default size of one read of a process's output (the agent answers at most 1 MiB).
READ_SIZE = 65536

# The agent's status codes that have a precise Cocoon error (the agent client reports them all as
# AgentError with ``code``): a caller can catch NotFound / StateError / ... as everywhere else.
_BY_CODE: dict[str, type[CocoonError]] = {
    "NOT_FOUND": NotFound,
    "ALREADY_EXISTS": AlreadyExists,
    "INVALID_ARGUMENT": InvalidArgument,
    "FAILED_PRECONDITION": StateError,
}


@contextlib.contextmanager
def agent_errors(what: str, **context: str | None) -> Iterator[None]:
    """Give errors raised inside a step name and context: ``<what>: <message> (sandbox=..., ...)``.

    Agent errors with a status code become the matching Cocoon error (NOT_FOUND -> NotFound,
    FAILED_PRECONDITION -> StateError, ...), chained to the original.
    """
    try:
        yield
    except AgentError as exc:
        cls = _BY_CODE.get(str(exc.context.get("code", "")), type(exc))
        merged = {**context, **{k: v for k, v in exc.context.items() if k not in context}}
        raise cls(f"{what}: {exc.message}", **merged) from exc
    except CocoonError as exc:
        exc.add_context(**context)
        raise


class Process:
    """A process in a container: its init (``exec_id == ""``) or one started by :meth:`Container.exec`.

    Output is pulled: :meth:`read_stdout`/:meth:`read_stderr` wait for bytes and return ``b""`` at
    end of stream. :meth:`wait` answers once the process exited *and* both streams were read to the
    end (or the container was removed), so a caller that reads to EOF and then waits has all output.
    """

    def __init__(self, container: Container, exec_id: str) -> None:
        self._container = container
        self.exec_id = exec_id
        self._status: int | None = None
        self._wait_task: asyncio.Task[int] | None = None
        self._stdin_closed = False

    @property
    def container_id(self) -> str:
        """The id of the container the process runs in."""
        return self._container.id

    @property
    def sandbox_id(self) -> str:
        """The id of the sandbox (VM) the process runs in."""
        return self._container.sandbox_id

    @property
    def is_init(self) -> bool:
        """True for the container's init (exec id ``""``)."""
        return self.exec_id == ""

    @property
    def exit_status(self) -> int | None:
        """The shell-style exit status once :meth:`wait` learned it, else None."""
        return self._status

    def _ctx(self) -> dict[str, str | None]:
        return {"sandbox": self.sandbox_id, "container": self.container_id, "exec_id": self.exec_id or None}

    def _agent(self, action: str) -> AgentClient:
        return self._container._agent(action, exec_id=self.exec_id)

    async def wait(self) -> int:
        """The exit status: the exit code, or 128 + N for a death by signal N (SIGKILL: 137).

        Answers once the process exited and its output was read to the end (or the container was
        removed). Any number of callers may wait at once and again later: the status is kept here
        (the agent forgets an exec process once it told its status). Cancelling a caller does not
        cancel the wait of the others.
        """
        if self._status is not None:
            return self._status
        return await asyncio.shield(self._waiter())

    def _waiter(self) -> asyncio.Task[int]:
        """The one WaitProcess call of this process, started on first use."""
        if self._wait_task is None:
            agent = self._agent("wait for process")
            self._wait_task = asyncio.get_running_loop().create_task(
                self._wait_rpc(agent), name=f"wait {self.container_id}/{self.exec_id}"
            )
            self._wait_task.add_done_callback(self._waited)
            self._container._track(self._wait_task)
        return self._wait_task

    async def _wait_rpc(self, agent: AgentClient) -> int:
        with agent_errors("wait for process", **self._ctx()):
            return await agent.wait_process(self.container_id, self.exec_id)

    def _waited(self, task: asyncio.Task[int]) -> None:
        if task.cancelled() or task.exception() is not None:  # retrieved here: no "never retrieved" warning
            self._wait_task = None  # a later wait() asks again (or says why it cannot)
            return
        self._status = task.result()
        self._container._process_exited(self)

    async def write_stdin(self, data: bytes) -> int:
        """Write all of ``data`` to the process's stdin (waits while the pipe is full); returns its length."""
        agent = self._agent("write stdin")
        with agent_errors("write stdin", **self._ctx()):
            return await agent.write_stdin(self.container_id, self.exec_id, data)

    async def close_stdin(self) -> None:
        """End of input (a terminal gets its EOF character, ^D). Closing twice is a no-op."""
        if self._stdin_closed:
            return
        agent = self._agent("close stdin")
        with agent_errors("close stdin", **self._ctx()):
            await agent.close_stdin(self.container_id, self.exec_id)
        self._stdin_closed = True

    async def read_stdout(self, n: int = READ_SIZE) -> bytes:
        """Up to ``n`` bytes of stdout, waiting until there are some; ``b""`` at end of stream (and after)."""
        agent = self._agent("read stdout")
        with agent_errors("read stdout", **self._ctx()):
            return await agent.read_stdout(self.container_id, self.exec_id, n)

    async def read_stderr(self, n: int = READ_SIZE) -> bytes:
        """Like :meth:`read_stdout` for stderr; a terminal process has none (``b""`` at once)."""
        agent = self._agent("read stderr")
        with agent_errors("read stderr", **self._ctx()):
            return await agent.read_stderr(self.container_id, self.exec_id, n)

    async def resize(self, rows: int, cols: int) -> None:
        """Set the terminal's window size (only for a process with ``terminal: true``)."""
        agent = self._agent("resize terminal")
        with agent_errors("resize terminal", **self._ctx()):
            await agent.tty_win_resize(self.container_id, self.exec_id, rows, cols)

    async def signal(self, sig: int) -> None:
        """Send ``sig`` to this process. A process that already exited: NotFound.

        A container's init is PID 1 of its namespace: it ignores signals it has no handler for
        (SIGTERM to ``sleep`` does nothing); SIGKILL always works.
        """
        agent = self._agent("signal process")
        with agent_errors("signal process", **self._ctx()):
            await agent.signal_process(self.container_id, self.exec_id, int(sig))

    async def output(self, input: bytes | None = None) -> tuple[bytes, bytes, int]:
        """Like ``subprocess.communicate``: write ``input`` (if any), close stdin, read stdout and
        stderr to the end, wait; returns ``(stdout, stderr, status)``.

        Closing stdin is skipped silently if the process has closed it already (or exited).
        """
        if input:
            await self.write_stdin(input)
        with contextlib.suppress(StateError, NotFound):
            await self.close_stdin()
        out, err = await asyncio.gather(self._read_all(self.read_stdout), self._read_all(self.read_stderr))
        return out, err, await self.wait()

    @staticmethod
    async def _read_all(read: Any) -> bytes:
        chunks = []
        while chunk := await read():
            chunks.append(chunk)
        return b"".join(chunks)

    def __repr__(self) -> str:
        return f"<Process {self.container_id}/{self.exec_id or '(init)'} status={self._status}>"


class Container:
    """A container in a running :class:`~cocoon.api.sandbox.Sandbox` (one VM, shared by the pod).

    Life cycle (``state``, a :class:`cocoon.api.state.Status`): ``created`` -> :meth:`start` ->
    ``running`` <-> :meth:`pause`/:meth:`resume` ``paused``; ``stopped`` once the init's exit status
    is known (see :meth:`Process.wait`) or after :meth:`remove`. A removed container (or one whose
    sandbox stopped) refuses every call with StateError.
    """

    def __init__(self, sandbox: Sandbox, container_id: str, spec: Spec) -> None:
        self._sandbox = sandbox
        self.id = container_id
        self.spec = spec
        self.init = Process(self, "")
        self._state = Status.CREATED
        self._execs: dict[str, Process] = {}
        self._removed = False
        self._lock = asyncio.Lock()

    @property
    def sandbox_id(self) -> str:
        """The id of the sandbox the container runs in."""
        return self._sandbox.id

    @property
    def state(self) -> Status:
        """created, running, paused or stopped."""
        return self._state

    @property
    def removed(self) -> bool:
        """True once :meth:`remove` ran (or the sandbox stopped)."""
        return self._removed

    @property
    def exit_status(self) -> int | None:
        """The init's exit status, once known."""
        return self.init.exit_status

    @property
    def execs(self) -> Mapping[str, Process]:
        """Exec processes whose exit status has not been collected yet, by exec id."""
        return dict(self._execs)

    # -- internals used by Process and Sandbox ----------------------------------------------------
    def _ctx(self) -> dict[str, str | None]:
        return {"sandbox": self.sandbox_id, "container": self.id}

    def _agent(self, action: str, *, exec_id: str = "") -> AgentClient:
        if self._removed:
            raise StateError(f"cannot {action}: the container was removed", **self._ctx(),
                             exec_id=exec_id or None)  # fmt: skip
        return self._sandbox._agent_for(action, container=self.id, exec_id=exec_id or None)

    def _require(self, action: str) -> AgentClient:
        agent = self._agent(action)
        try:
            self._state.require(action)
        except StateError as exc:
            exc.add_context(**self._ctx())
            raise
        return agent

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._sandbox._track(task)

    def _process_exited(self, process: Process) -> None:
        if process.is_init:
            if self._state is not Status.STOPPED:
                self._state = Status.STOPPED
                log.debug("container exited", sandbox=self.sandbox_id, container=self.id, status=process.exit_status)
        elif self._execs.get(process.exec_id) is process:
            del self._execs[process.exec_id]  # the agent forgot it too: the id may be used again

    def _forget(self) -> None:
        """Gone from the guest (removed, or the sandbox stopped): refuse every further call."""
        self._removed = True
        self._state = Status.STOPPED

    # -- the API ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Run the container's process (``created`` -> ``running``)."""
        async with self._lock:
            agent = self._require("start")
            with agent_errors("start container", **self._ctx()):
                await agent.start_container(self.id)
            self._state = self._state.transition(Status.RUNNING)
            # Learn the init's exit without anyone asking: ``state`` turns ``stopped`` once the init
            # exited and its output was read (WaitProcess semantics). Its status outlives removal.
            self.init._waiter()

    async def exec(self, exec_id: str, process: Mapping[str, Any]) -> Process:
        """Start ``process`` (an OCI process object: args, env, cwd, user, terminal, ...) in the container.

        ``exec_id`` names the process within the container (``[A-Za-z0-9_+.-]``); it is taken until
        the process's status was collected by :meth:`Process.wait`. The container must be created
        or running (not paused).
        """
        validate_id(exec_id, "exec id")
        from cocoon.oci.spec import parse_process

        parse_process(dict(process), source=f"exec {exec_id}")  # InvalidArgument naming the field
        agent = self._require("exec")
        if exec_id in self._execs:
            raise AlreadyExists("exec id in use", **self._ctx(), exec_id=exec_id)
        proc = Process(self, exec_id)
        self._execs[exec_id] = proc
        try:
            with agent_errors("exec process", **self._ctx(), exec_id=exec_id):
                await agent.exec_process(self.id, exec_id, dict(process))
        except BaseException:
            self._execs.pop(exec_id, None)
            raise
        return proc

    async def signal(self, sig: int, all: bool = False) -> None:
        """Send ``sig`` to the init, or with ``all`` to every process of the container."""
        agent = self._require("kill")
        with agent_errors("signal container", **self._ctx()):
            await agent.signal_process(self.id, "", int(sig), all_processes=all)

    async def pause(self) -> None:
        """Freeze every process of the container (``running`` -> ``paused``)."""
        async with self._lock:
            agent = self._require("pause")
            with agent_errors("pause container", **self._ctx()):
                await agent.pause_container(self.id)
            self._state = self._state.transition(Status.PAUSED)

    async def resume(self) -> None:
        """Thaw them (``paused`` -> ``running``)."""
        async with self._lock:
            agent = self._require("resume")
            with agent_errors("resume container", **self._ctx()):
                await agent.resume_container(self.id)
            self._state = self._state.transition(Status.RUNNING)

    async def stats(self) -> ContainerStats:
        """CPU, memory, pids and I/O counters of the container's cgroup in the guest."""
        agent = self._agent("stats")
        with agent_errors("container stats", **self._ctx()):
            return await agent.stats_container(self.id)

    async def update(self, resources: Mapping[str, Any]) -> None:
        """Apply new OCI ``linux.resources`` (memory, cpu, pids, ...) to the container's cgroup.

        The VM is not resized: the sandbox's ``memory_mib``/``vcpus`` bound what the limits can give.
        """
        agent = self._agent("update")
        if self._state is Status.STOPPED:
            raise StateError("cannot update container: it is stopped", **self._ctx(), state=str(self._state))
        with agent_errors("update container", **self._ctx()):
            await agent.update_container(self.id, dict(resources))

    async def remove(self) -> None:
        """Kill every process of the container, delete it in the guest, undo its mounts. Idempotent.

        Allowed in any state (it is ``delete --force``). Pending :meth:`Process.wait` calls return
        (SIGKILL: 137); pending reads return end of stream.
        """
        async with self._lock:
            if self._removed:
                return
            agent = self._sandbox._agent_or_none()
            if agent is not None:
                try:
                    with agent_errors("remove container", **self._ctx()):
                        await agent.remove_container(self.id, wait=REMOVE_WAIT, timeout=REMOVE_WAIT + 20.0)
                except NotFound:
                    pass  # already gone in the guest
                except CocoonError:
                    if self._sandbox._agent_or_none() is not None:
                        raise  # the sandbox still runs: the caller may retry
            self._forget()
            self._sandbox._container_removed(self)
        log.info("container removed", sandbox=self.sandbox_id, container=self.id)

    def __repr__(self) -> str:
        return f"<Container {self.id} in {self.sandbox_id}: {self._state}>"
