"""What the shim knows of each task and process it serves to containerd.

A :class:`ShimProcess` is one process containerd sees — a task's init (exec id ``""``) or an exec —
with containerd's stdio paths, its status in containerd's terms and, once it ended, its exit
status and time. It is backed by a :class:`cocoon.api.sandbox.Process` in the guest, or, for a
pod's sandbox container, by nothing at all: :class:`PauseProcess` behaves like the pause binary
(runs until SIGTERM/SIGINT, exit 0, or SIGKILL, 137) without costing a process in the VM.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cocoon.errors import CocoonError, NotFound, StateError
from cocoon.log import get_logger
from cocoon.shim.fifo_io import ProcessIO

if TYPE_CHECKING:
    from cocoon.api.sandbox import Container, Process

log = get_logger("shim")

# containerd.v1.types.Status
UNKNOWN, CREATED, RUNNING, STOPPED, PAUSED = 0, 1, 2, 3, 4

#: Annotations containerd's CRI plugin puts on a pod's containers.
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"

#: Pod-level limits containerd 1.7+ puts on the sandbox container (1.6 leaves them out).
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"
SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"

ExitCallback = Callable[["ShimProcess"], None]


def pod_limits(raw: Mapping[str, Any]) -> tuple[int, int, int]:
    """(memory bytes, CPU quota, CPU period) of a pod, from its sandbox container's spec: the CRI
    sandbox annotations where present, else the spec's ``linux.resources``; 0 for "none"."""
    notes = raw.get("annotations") or {}
    resources = (raw.get("linux") or {}).get("resources") or {}
    memory = (resources.get("memory") or {}).get("limit") or 0
    cpu = resources.get("cpu") or {}
    values = [memory, cpu.get("quota") or 0, cpu.get("period") or 0]
    for i, key in enumerate((SANDBOX_MEMORY, SANDBOX_CPU_QUOTA, SANDBOX_CPU_PERIOD)):
        text = str(notes.get(key, "")).strip()
        if text.lstrip("-").isdigit():
            values[i] = int(text)
    return max(0, int(values[0])), max(0, int(values[1])), max(0, int(values[2]))


class ShimProcess:
    """One process of a task as containerd sees it."""

    def __init__(self, task_id: str, exec_id: str, io: ProcessIO, *, pid: int, spec: dict[str, Any] | None = None):
        self.task_id = task_id
        self.exec_id = exec_id
        self.io = io
        self.pid = pid
        self.spec = spec  # an exec's OCI process, run at Start
        self.status = CREATED
        self.exit_status = 0
        self.exited_at: float | None = None
        self._exited = asyncio.Event()
        self.guest: Process | None = None
        self._waiter: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.task_id}/{self.exec_id}" if self.exec_id else self.task_id

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    def attach(self, guest: Process, on_exit: ExitCallback) -> None:
        """The guest process exists: relay its stdio and learn its exit."""
        self.guest = guest
        self.io.attach(guest)
        self._waiter = asyncio.get_running_loop().create_task(self._wait(guest, on_exit), name=f"wait {self.name}")

    async def _wait(self, guest: Process, on_exit: ExitCallback) -> None:
        try:
            status = await guest.wait()
        except CocoonError as exc:  # the VM died under it, or it was removed
            log.warning("lost the process", process=self.name, error=str(exc))
            status = 128 + signal.SIGKILL
        await self.io.drained()  # every byte reached containerd's fifo before the exit is told
        self.set_exited(status)
        on_exit(self)

    def set_exited(self, status: int) -> None:
        if self._exited.is_set():
            return
        self.status, self.exit_status, self.exited_at = STOPPED, status, time.time()
        self.io.close()
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        return self.exit_status

    async def signal(self, sig: int) -> None:
        if self.exited or self.guest is None:
            raise NotFound("process already finished" if self.exited else "process not started",
                           process=self.name)  # fmt: skip
        await self.guest.signal(sig)

    def close(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
        self.io.close()


class PauseProcess(ShimProcess):
    """A pod's sandbox container: no process in the guest, the behaviour of ``pause``."""

    def start(self, on_exit: ExitCallback) -> None:
        self.status = RUNNING
        self._on_exit = on_exit

    async def signal(self, sig: int) -> None:
        if self.exited:
            raise NotFound("process already finished", process=self.name)
        if self.status == CREATED:
            raise StateError("sandbox container not started", process=self.name, state="created")
        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            self.set_exited(0 if sig != signal.SIGKILL else 128 + signal.SIGKILL)
            self._on_exit(self)
        # pause ignores every other signal


@dataclass
class Task:
    """A container containerd created through this shim."""

    id: str
    bundle: Path
    init: ShimProcess
    rootfs_mounted: bool = False
    container: Container | None = None  # None for a pod's sandbox container
    execs: dict[str, ShimProcess] = field(default_factory=dict)
    #: the task whose Delete stops the VM (a pod's sandbox container, or a container alone in its VM)
    owns_sandbox: bool = False

    def process(self, exec_id: str) -> ShimProcess:
        if not exec_id:
            return self.init
        found = self.execs.get(exec_id)
        if found is None:
            raise NotFound("no such exec process", container=self.id, exec_id=exec_id)
        return found

    @property
    def status(self) -> int:
        return self.init.status
