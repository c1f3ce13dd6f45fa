"""Shared by the protocol tests: a test Echo service (unary and every kind of stream) built in a
private descriptor pool, its implementation, and an fd counter. (Not in conftest.py: test modules
import these by name, and several test directories have a conftest module.)"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from cocoon import errors
from cocoon.protocol import ttrpc

_F = descriptor_pb2.FieldDescriptorProto


def _build_echo() -> tuple[Any, type, type]:
    """cocoon.test.Echo, in a private pool so it never touches the default one."""
    fdp = descriptor_pb2.FileDescriptorProto(name="cocoon/test/echo.proto", package="cocoon.test", syntax="proto3")
    req = fdp.message_type.add(name="EchoRequest")
    req.field.add(name="text", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    req.field.add(name="count", number=2, type=_F.TYPE_INT32, label=_F.LABEL_OPTIONAL)
    req.field.add(name="delay", number=3, type=_F.TYPE_DOUBLE, label=_F.LABEL_OPTIONAL)
    req.field.add(name="fail", number=4, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    req.field.add(name="blob", number=5, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)
    rep = fdp.message_type.add(name="EchoReply")
    rep.field.add(name="text", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    rep.field.add(name="index", number=2, type=_F.TYPE_INT32, label=_F.LABEL_OPTIONAL)
    rep.field.add(name="blob", number=3, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)
    svc = fdp.service.add(name="Echo")
    io = {"input_type": ".cocoon.test.EchoRequest", "output_type": ".cocoon.test.EchoReply"}
    svc.method.add(name="Unary", **io)
    svc.method.add(name="ServerStream", server_streaming=True, **io)
    svc.method.add(name="ClientStream", client_streaming=True, **io)
    svc.method.add(name="Bidi", client_streaming=True, server_streaming=True, **io)
    svc.method.add(name="Missing", **io)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (
        pool.FindServiceByName("cocoon.test.Echo"),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("cocoon.test.EchoRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("cocoon.test.EchoReply")),
    )


ECHO, EchoRequest, EchoReply = _build_echo()
SERVICE = "cocoon.test.Echo"

FAILURES: dict[str, Exception] = {
    "NotFound": errors.NotFound("no such container", id="c1"),
    "InvalidArgument": errors.InvalidArgument("bad id", field="id"),
    "StateError": errors.StateError("container is running", state="running"),
    "AlreadyExists": errors.AlreadyExists("id taken", id="c1"),
    "Cocoon": errors.HypervisorError("qemu died"),
    "Value": ValueError("boom"),
    "Timeout": TimeoutError("slow disk"),
    "NotImplemented": NotImplementedError("later"),
    "Unavailable": ttrpc.Unavailable("try again"),
}


class EchoImpl:
    """Echo: answers with what it got (``blob`` repeated ``count`` times); ``delay`` sleeps,
    ``fail`` raises FAILURES[fail]."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.stream_ids: list[int] = []
        self.metadata: list[dict[str, list[str]]] = []
        self.deadlines: list[float | None] = []

    async def _behave(self, request: Any) -> None:
        if request.delay:
            try:
                await asyncio.sleep(request.delay)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if request.fail:
            raise FAILURES[request.fail]

    async def Unary(self, request: Any, ctx: ttrpc.ServerContext) -> Any:
        self.stream_ids.append(ctx.stream_id)
        self.metadata.append(ctx.metadata)
        self.deadlines.append(ctx.time_remaining())
        await self._behave(request)
        return EchoReply(text=request.text, index=ctx.stream_id, blob=request.blob * max(1, request.count))

    async def ServerStream(self, stream: ttrpc.ServerStream, ctx: ttrpc.ServerContext) -> Any:
        request = await stream.recv()
        for i in range(request.count):
            if request.fail and i == 2:
                raise FAILURES[request.fail]
            await stream.send(EchoReply(text=request.text, index=i))
        return None

    async def ClientStream(self, stream: ttrpc.ServerStream, ctx: ttrpc.ServerContext) -> Any:
        texts = [message.text async for message in stream]
        return EchoReply(text="+".join(texts), index=len(texts))

    async def Bidi(self, stream: ttrpc.ServerStream, ctx: ttrpc.ServerContext) -> Any:
        async for message in stream:
            await stream.send(EchoReply(text=message.text.upper()))
        return None


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))
