"""The ttrpc envelope: ttrpc.Request in request frames, ttrpc.Response in response frames.

The common shapes are encoded by hand - a request without metadata, an OK response - and
a small OK response is read by hand; these are the hot paths of every call. The bytes are
exactly what the generated classes produce (fields in number order, defaults omitted;
tests compare the two). Everything else, and all parsing of what a peer sends to a
server, goes through the generated classes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from cocoon.protocol.gen.google.rpc import status_pb2
from cocoon.protocol.gen.ttrpc import request_pb2
from cocoon.protocol.ttrpc.errors import Code, PayloadError, RPCError

Metadata = Mapping[str, str | Iterable[str]]

# Response{status: Status{} (code OK), payload: ...}: Go servers always send an (empty) status.
_OK_STATUS = b"\x0a\x00"


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@functools.lru_cache(maxsize=256)
def _request_prefix(service: str, method: str) -> bytes:
    """Fields 1 and 2 of a Request: the same for every call of a method."""
    out = b""
    for tag, text in ((b"\x0a", service), (b"\x12", method)):
        if text:
            raw = text.encode()
            out += tag + _varint(len(raw)) + raw
    return out


def encode_request(
    service: str, method: str, payload: bytes, timeout: float | None = None, metadata: Metadata | None = None
) -> bytes:
    """A serialized ttrpc.Request (``timeout`` in seconds becomes ``timeout_nano``)."""
    timeout_nano = 0 if timeout is None else max(1, int(timeout * 1_000_000_000))
    if metadata:
        request = request_pb2.Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
        for key, values in metadata.items():
            for value in (values,) if isinstance(values, str) else values:
                request.metadata.add(key=key, value=value)
        data: bytes = request.SerializeToString()
        return data
    parts = [_request_prefix(service, method)]
    if payload:
        parts += (b"\x1a", _varint(len(payload)), payload)
    if timeout_nano:
        parts += (b"\x20", _varint(timeout_nano))
    return b"".join(parts)


def decode_request(data: bytes) -> Any:
    """A parsed ttrpc.Request; raises :class:`PayloadError` if ``data`` is not one."""
    try:
        return request_pb2.Request.FromString(data)
    except Exception as exc:  # protobuf raises DecodeError, or ValueError on bad UTF-8
        raise PayloadError("cannot decode ttrpc request", error=str(exc)) from exc


def metadata_of(request: Any) -> dict[str, list[str]]:
    """The metadata of a parsed request as key -> values (keys repeat on the wire)."""
    result: dict[str, list[str]] = {}
    for pair in request.metadata:
        result.setdefault(pair.key, []).append(pair.value)
    return result


def encode_ok_response(payload: bytes) -> bytes:
    """A serialized ttrpc.Response with status OK carrying ``payload``."""
    if not payload:
        return _OK_STATUS
    return b"".join((_OK_STATUS, b"\x12", _varint(len(payload)), payload))


def encode_error_response(code: Code | int, message: str) -> bytes:
    """A serialized ttrpc.Response with a non-OK status and no payload."""
    response = request_pb2.Response(status=status_pb2.Status(code=int(code), message=message))
    data: bytes = response.SerializeToString()
    return data


def decode_response(data: bytes, **context: Any) -> bytes:
    """The payload of a serialized ttrpc.Response, or the RPCError its status says."""
    if data[:3] == b"\x0a\x00\x12" and len(data) > 3 and data[3] < 0x80 and len(data) == 4 + data[3]:
        return data[4:]  # OK with a payload under 128 bytes: the common answer
    try:
        response = request_pb2.Response.FromString(data)
    except Exception as exc:
        raise PayloadError("cannot decode ttrpc response", error=str(exc), **context) from exc
    status = response.status
    if status.code != Code.OK:
        raise RPCError.from_status(status.code, status.message, tuple(status.details), **context)
    payload: bytes = response.payload
    return payload
