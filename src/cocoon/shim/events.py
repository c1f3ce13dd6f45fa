"""Publishing task events to containerd, in order, surviving a containerd restart.

A shim v2 sends each event as an ``Envelope`` (timestamp, namespace, topic, the event packed in an
Any whose type URL is the message's full name) with ``containerd.services.events.ttrpc.v1.Events/
Forward`` on containerd's ttRPC socket (``$TTRPC_ADDRESS``). Events leave one at a time from one
queue, so their order is the order they were published in (TaskStart before that task's TaskExit,
as containerd's runtime v2 contract requires). A failed send is retried with a fresh connection
(containerd may be restarting) for :data:`RETRY_SECONDS`, then dropped with an error line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from google.protobuf.message import Message

from cocoon.errors import CocoonError
from cocoon.log import get_logger

log = get_logger("shim")

#: How long one event is retried before it is dropped (containerd restarting takes a few seconds).
RETRY_SECONDS = 60.0
#: Seconds :meth:`Publisher.close` waits for queued events to leave.
DRAIN_SECONDS = 5.0

# Topics (containerd runtime/events.go).
TASK_CREATE = "/tasks/create"
TASK_START = "/tasks/start"
TASK_EXIT = "/tasks/exit"
TASK_DELETE = "/tasks/delete"
TASK_EXEC_ADDED = "/tasks/exec-added"
TASK_EXEC_STARTED = "/tasks/exec-started"
TASK_OOM = "/tasks/oom"
TASK_PAUSED = "/tasks/paused"
TASK_RESUMED = "/tasks/resumed"


def timestamp(when: float | None = None) -> Any:
    """A google.protobuf.Timestamp for ``when`` (seconds since the epoch; now by default)."""
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() if when is None else when) * 1e9))
    return ts


def pack(event: Message) -> Any:
    """``event`` in an Any with containerd's type URL (the bare full name, as typeurl writes it)."""
    from google.protobuf.any_pb2 import Any as AnyPb

    return AnyPb(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())


class Publisher:
    """Sends events to containerd's ttRPC address, one after the other, retrying through restarts.

    Without an address (a shim started by hand) events are only logged.
    """

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self._queue: asyncio.Queue[tuple[str, Message] | None] = asyncio.Queue()
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0

    def start(self) -> None:
        """Begin sending (call from the event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="shim events")

    def publish(self, topic: str, event: Message) -> None:
        """Queue ``event`` on ``topic``; it leaves after every event queued before it."""
        log.debug("event", topic=topic, event=type(event).__name__)
        self._queue.put_nowait((topic, event))

    async def close(self) -> None:
        """Send what is queued (for up to :data:`DRAIN_SECONDS`), then disconnect."""
        if self._task is not None:
            self._queue.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._task), DRAIN_SECONDS)
            except TimeoutError:
                log.warning("events not sent before exit", left=self._queue.qsize())
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self._disconnect()

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            topic, event = item
            if not self.address:
                continue
            await self._send(topic, event)

    async def _send(self, topic: str, event: Message) -> None:
        from cocoon.protocol.gen.containerd.services.events.ttrpc.v1 import events_pb2

        request = events_pb2.ForwardRequest(envelope=events_pb2.Envelope(
            timestamp=timestamp(), namespace=self.namespace, topic=topic, event=pack(event)))  # fmt: skip
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.05
        while True:
            try:
                client = await self._connect()
                await client.call("containerd.services.events.ttrpc.v1.Events", "Forward", request,
                                  _empty(), timeout=10.0)  # fmt: skip
                self.sent += 1
                return
            except (CocoonError, OSError) as exc:
                await self._disconnect()
                if time.monotonic() + delay > deadline:
                    self.dropped += 1
                    log.error("event dropped: containerd does not take it", topic=topic, error=str(exc))
                    return
                log.debug("publishing failed, retrying", topic=topic, error=str(exc), seconds=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _connect(self) -> Any:
        if self._client is None or self._client.closed:
            from cocoon.protocol.ttrpc.client import connect_unix

            self._client = await connect_unix(self.address)
        return self._client

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(CocoonError, OSError):
                await client.close()


def _empty() -> type[Message]:
    from google.protobuf.empty_pb2 import Empty

    return Empty
