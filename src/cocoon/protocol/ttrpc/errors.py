"""The wire-level error tree of Cocoon and the gRPC status codes ttrpc carries.

Tree::

    ProtocolError(CocoonError)      anything that went wrong talking ttrpc
    ├── FrameError                  a frame that breaks the framing rules
    │   ├── OversizedFrame          length above MAX_MESSAGE_SIZE (payload discarded)
    │   ├── TruncatedFrame          the stream ended inside a header or a payload
    │   ├── UnknownMessageType      a type byte other than request/response/data
    │   └── BadStreamId             wrong parity, reused or inactive stream id
    ├── PayloadError                a frame whose payload does not decode
    ├── ConnectionClosed            the connection is gone (EOF, reset, closed locally)
    └── RPCError                    the peer answered with a non-OK status (code, message)
        ├── Canceled, Unknown, InvalidArgument, DeadlineExceeded, NotFound,
        │   AlreadyExists, PermissionDenied, ResourceExhausted, FailedPrecondition,
        │   Aborted, OutOfRange, Unimplemented, Internal, Unavailable, DataLoss,
        │   Unauthenticated  (one per gRPC code)

Errors keep their meaning across the VM boundary: a server handler raising
:class:`cocoon.errors.NotFound` answers ``NOT_FOUND``, and the client raises
:class:`NotFound` here, which is also a :class:`cocoon.errors.NotFound` (likewise
InvalidArgument, AlreadyExists, and FailedPrecondition for StateError).
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

from cocoon import errors


class Code(enum.IntEnum):
    """gRPC status codes (google.rpc.Code), as carried in google.rpc.Status.code."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ProtocolError(errors.CocoonError):
    """Root of every ttrpc failure: framing, connection or a non-OK status."""


class FrameError(ProtocolError):
    """A frame breaks the framing rules (``stream_id``, ``length``, ``msg_type`` in context)."""


class OversizedFrame(FrameError):
    """A frame longer than the 4 MiB maximum; its payload was read and discarded."""


class TruncatedFrame(FrameError):
    """The byte stream ended inside a frame (``received`` bytes of ``expected``)."""


class UnknownMessageType(FrameError):
    """A frame with a type byte this implementation does not know; its payload was consumed."""


class BadStreamId(FrameError):
    """A stream id with the wrong parity, reused, or naming no active stream."""


class PayloadError(ProtocolError):
    """A frame arrived intact but its protobuf payload does not decode."""


class ConnectionClosed(ProtocolError):
    """The connection is closed: the peer went away or it was closed locally."""


class RPCError(ProtocolError):
    """The peer finished a call with a non-OK status.

    ``code`` is a :class:`Code`, ``status_message`` the peer's message and ``details``
    the raw google.protobuf.Any details. Subclasses exist for every code; build the
    right one with :meth:`from_status`. Raising one in a server handler answers with
    its code.
    """

    CODE: ClassVar[Code] = Code.UNKNOWN

    def __init__(self, code: Code | int, message: str, *, details: tuple[Any, ...] = (), **context: Any):
        try:
            self.code = Code(code)
        except ValueError:
            self.code = Code.UNKNOWN
            context.setdefault("raw_code", code)
        super().__init__(message, **{"code": self.code.name, **context})
        self.status_message = message
        self.details = details

    @staticmethod
    def from_status(code: Code | int, message: str, details: tuple[Any, ...] = (), **context: Any) -> RPCError:
        """The RPCError subclass for ``code`` (an unknown number becomes UNKNOWN)."""
        try:
            coded = _BY_CODE.get(Code(code))
        except ValueError:
            coded = None
        if coded is None:
            return RPCError(code, message, details=details, **context)
        return coded(message, details=details, **context)


class _Coded(RPCError):
    """An RPCError whose code is fixed by its class: ``raise NotFound("no such container", id=cid)``."""

    def __init__(self, message: str = "", *, details: tuple[Any, ...] = (), **context: Any):
        super().__init__(self.CODE, message or self.CODE.name.lower().replace("_", " "), details=details, **context)


class Canceled(_Coded):
    """CANCELLED: the caller gave up on the call."""

    CODE = Code.CANCELLED


class Unknown(_Coded):
    """UNKNOWN: the handler failed with an error that has no better code."""

    CODE = Code.UNKNOWN


class InvalidArgument(_Coded, errors.InvalidArgument):
    """INVALID_ARGUMENT: the request is malformed or names something invalid."""

    CODE = Code.INVALID_ARGUMENT


class DeadlineExceeded(_Coded):
    """DEADLINE_EXCEEDED: the call did not finish within its timeout."""

    CODE = Code.DEADLINE_EXCEEDED


class NotFound(_Coded, errors.NotFound):
    """NOT_FOUND: the container, process, file... does not exist."""

    CODE = Code.NOT_FOUND


class AlreadyExists(_Coded, errors.AlreadyExists):
    """ALREADY_EXISTS: the id is taken."""

    CODE = Code.ALREADY_EXISTS


class PermissionDenied(_Coded):
    """PERMISSION_DENIED: the caller may not do this."""

    CODE = Code.PERMISSION_DENIED


class ResourceExhausted(_Coded):
    """RESOURCE_EXHAUSTED: a message was too large or a limit was hit."""

    CODE = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(_Coded, errors.StateError):
    """FAILED_PRECONDITION: not allowed in the current state (a StateError on the peer)."""

    CODE = Code.FAILED_PRECONDITION


class Aborted(_Coded):
    """ABORTED: the operation was aborted, typically by a concurrency conflict."""

    CODE = Code.ABORTED


class OutOfRange(_Coded):
    """OUT_OF_RANGE: past the end of a valid range."""

    CODE = Code.OUT_OF_RANGE


class Unimplemented(_Coded):
    """UNIMPLEMENTED: the peer does not serve this service or method."""

    CODE = Code.UNIMPLEMENTED


class Internal(_Coded):
    """INTERNAL: an invariant of the peer broke (a bug on the other side)."""

    CODE = Code.INTERNAL


class Unavailable(_Coded):
    """UNAVAILABLE: the service cannot be reached now; retrying may help."""

    CODE = Code.UNAVAILABLE


class DataLoss(_Coded):
    """DATA_LOSS: unrecoverable data loss or corruption."""

    CODE = Code.DATA_LOSS


class Unauthenticated(_Coded):
    """UNAUTHENTICATED: the caller is not authenticated."""

    CODE = Code.UNAUTHENTICATED


_BY_CODE: dict[Code, type[_Coded]] = {
    cls.CODE: cls
    for cls in (
        Canceled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists, PermissionDenied,
        ResourceExhausted, FailedPrecondition, Aborted, OutOfRange, Unimplemented, Internal, Unavailable,
        DataLoss, Unauthenticated,
    )
}

# Local exceptions a server handler may raise, and the status they answer with. First match wins,
# so subclasses come before their bases.
_EXCEPTION_CODES: tuple[tuple[type[BaseException], Code], ...] = (
    (errors.NotFound, Code.NOT_FOUND),
    (errors.AlreadyExists, Code.ALREADY_EXISTS),
    (errors.InvalidArgument, Code.INVALID_ARGUMENT),
    (errors.ConfigError, Code.INVALID_ARGUMENT),
    (errors.StateError, Code.FAILED_PRECONDITION),
    (errors.AgentTimeout, Code.DEADLINE_EXCEEDED),
    (ConnectionClosed, Code.UNAVAILABLE),
    (TimeoutError, Code.DEADLINE_EXCEEDED),
    (FileNotFoundError, Code.NOT_FOUND),
    (FileExistsError, Code.ALREADY_EXISTS),
    (PermissionError, Code.PERMISSION_DENIED),
    (NotImplementedError, Code.UNIMPLEMENTED),
)


def status_for_exception(exc: Exception) -> tuple[Code, str]:
    """The (code, message) a server answers with when a handler raised ``exc``.

    RPCErrors keep their code; Cocoon errors and a few builtins map to their gRPC
    meaning; any other CocoonError is UNKNOWN and anything else INTERNAL. The message
    is the error's one-line rendering (with its context).
    """
    if isinstance(exc, RPCError):
        return exc.code, exc.status_message
    for cls, code in _EXCEPTION_CODES:
        if isinstance(exc, cls):
            return code, str(exc) or type(exc).__name__
    if isinstance(exc, errors.CocoonError):
        return Code.UNKNOWN, str(exc)
    return Code.INTERNAL, f"{type(exc).__name__}: {exc}"
