"""containerd's ttRPC on asyncio: framing, server, client, transports, errors.

    server = Server()
    server.register_service(agent_pb2.DESCRIPTOR.services_by_name["Health"], HealthImpl())
    await server.serve_unix("/run/agent.sock")

    client = await connect_unix("/run/agent.sock")
    health = Stub(client, agent_pb2.DESCRIPTOR.services_by_name["Health"], timeout=5)
    reply = await health.Check(agent_pb2.CheckRequest())

See docs/protocol.md for the wire format, the error tree and the transports.
"""

from cocoon.protocol.ttrpc.chardev import CharDevTransport
from cocoon.protocol.ttrpc.client import Client, ClientStream, connect_unix, connect_vsock
from cocoon.protocol.ttrpc.errors import (
    Aborted,
    AlreadyExists,
    BadStreamId,
    Canceled,
    Code,
    ConnectionClosed,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FrameError,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    OversizedFrame,
    PayloadError,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    RPCError,
    TruncatedFrame,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    UnknownMessageType,
)
from cocoon.protocol.ttrpc.framing import HEADER_SIZE, MAX_MESSAGE_SIZE, Flags, Frame, MessageType
from cocoon.protocol.ttrpc.server import Server, ServerContext
from cocoon.protocol.ttrpc.stream import ServerStream
from cocoon.protocol.ttrpc.stub import Stub
from cocoon.protocol.ttrpc.transport import (
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_CID_LOCAL,
    Listener,
    ListeningSocketTransport,
    Transport,
    UnixTransport,
    VsockTransport,
)

__all__ = [
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "VMADDR_CID_ANY",
    "VMADDR_CID_HOST",
    "VMADDR_CID_LOCAL",
    "Aborted",
    "AlreadyExists",
    "BadStreamId",
    "Canceled",
    "CharDevTransport",
    "Client",
    "ClientStream",
    "Code",
    "ConnectionClosed",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Flags",
    "Frame",
    "FrameError",
    "Internal",
    "InvalidArgument",
    "Listener",
    "ListeningSocketTransport",
    "MessageType",
    "NotFound",
    "OutOfRange",
    "OversizedFrame",
    "PayloadError",
    "PermissionDenied",
    "ProtocolError",
    "RPCError",
    "ResourceExhausted",
    "Server",
    "ServerContext",
    "ServerStream",
    "Stub",
    "Transport",
    "TruncatedFrame",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UnixTransport",
    "Unknown",
    "UnknownMessageType",
    "VsockTransport",
    "connect_unix",
    "connect_vsock",
]
