"""Container ids: validated by a whitelist before any path is built from them.

The whitelist is runc's (``[\\w+-.]``, ASCII only, 1..1024 bytes) minus its accidental comma
(Go's ``+-\\.`` is a range), and ``.``/``..`` are refused, so an accepted id is always exactly one
path component that cannot climb out of the state root.

Unix socket paths are limited to 107 bytes, far less than an id may be long: per-id socket
directories are named by :func:`short_hash` instead of the id.
"""

from __future__ import annotations

import re

from cocoon.errors import InvalidArgument

MAX_ID_BYTES = 1024

# re.ASCII: Python's \w also matches letters and digits of every script; Go's (and runc's) does not.
_ID_RE = re.compile(r"[\w+\-.]+", re.ASCII)
_SHOWN = 64  # characters of a bad value quoted back in the error


def _shown(value: str) -> str:
    if len(value) > _SHOWN:
        return repr(value[:_SHOWN]) + f"... ({len(value)} characters)"
    return repr(value)


def _refuse(what: str, reason: str, value: str) -> InvalidArgument:
    return InvalidArgument(f"invalid {what}: {reason}", field=what, value=_shown(value))


def validate_id(value: str, what: str = "container id") -> str:
    """Return ``value`` if it is an acceptable id, else raise :class:`InvalidArgument`.

    ``what`` names the field in the error ("container id", "exec id", "sandbox id").
    The error is one line: control characters in the value are shown escaped.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"invalid {what}: must be a string", field=what, value=type(value).__name__)
    if not value:
        raise _refuse(what, "empty", value)
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise _refuse(what, f"longer than {MAX_ID_BYTES} bytes", value)
    if value in (".", ".."):
        raise _refuse(what, "'.' and '..' are not ids", value)
    if "/" in value:
        raise _refuse(what, "must not contain '/'", value)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise _refuse(what, "must not contain control characters", value)
    if not _ID_RE.fullmatch(value):
        raise _refuse(what, "has characters outside [A-Za-z0-9_+.-]", value)
    return value


def is_valid_id(value: str) -> bool:
    """True if :func:`validate_id` would accept ``value`` (cheap: for scanning directories)."""
    return len(value) <= MAX_ID_BYTES and value not in (".", "..") and _ID_RE.fullmatch(value) is not None


def short_hash(value: str) -> str:
    """16 hex digits of sha256(value): a short, stable directory name for an id's sockets."""
    import hashlib  # not on the `cocoon state` path

    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
