"""``Stub(client, service_descriptor)``: call RPCs by name, types taken from the descriptor.

    health = Stub(client, agent_pb2.DESCRIPTOR.services_by_name["Health"], timeout=5)
    response = await health.Check(agent_pb2.CheckRequest())
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from cocoon import errors
from cocoon.protocol.ttrpc.client import Client
from cocoon.protocol.ttrpc.wire import Metadata

_DEFAULT: Any = object()


class StubMethod:
    """One RPC of a :class:`Stub`; ``await method(request)`` calls it.

    For a streaming RPC the call opens and returns a :class:`ClientStream` instead.
    """

    def __init__(self, stub: Stub, method: MethodDescriptor) -> None:
        self._stub = stub
        self.service = method.containing_service.full_name
        self.name = method.name
        self.request_type: type[Message] = message_factory.GetMessageClass(method.input_type)
        self.response_type: type[Message] = message_factory.GetMessageClass(method.output_type)
        self.client_streaming: bool = method.client_streaming
        self.server_streaming: bool = method.server_streaming

    def __call__(
        self, request: Message | None = None, *, timeout: float | None = _DEFAULT, metadata: Metadata | None = None
    ) -> Awaitable[Any]:
        # Not async itself: hands back the client's coroutine, one frame less per call.
        stub = self._stub
        if timeout is _DEFAULT:
            timeout = stub.timeout
        if self.client_streaming or self.server_streaming:
            return stub.client.stream(
                self.service, self.name, self.response_type, request,
                client_streaming=self.client_streaming, server_streaming=self.server_streaming,
                timeout=timeout, metadata=metadata or stub.metadata,
            )
        return stub.client.call(
            self.service, self.name, self.request_type() if request is None else request, self.response_type,
            timeout=timeout, metadata=metadata or stub.metadata,
        )


class Stub:
    """Calls the RPCs of ``service`` over ``client``, as attributes named like the RPCs.

    ``timeout`` and ``metadata`` are defaults for every call; each call may override them.
    """

    def __init__(self, client: Client, service: ServiceDescriptor, *, timeout: float | None = None,
                 metadata: Metadata | None = None) -> None:
        self.client = client
        self.service = service
        self.timeout = timeout
        self.metadata = metadata
        self._methods = {m.name: StubMethod(self, m) for m in service.methods}

    def __getattr__(self, name: str) -> StubMethod:
        try:
            return self.__dict__["_methods"][name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(name) from None

    def method(self, name: str) -> StubMethod:
        """The RPC ``name``; raises :class:`cocoon.errors.NotFound` if the service has none."""
        try:
            return self._methods[name]
        except KeyError:
            raise errors.NotFound("no such method", service=self.service.full_name, method=name) from None
