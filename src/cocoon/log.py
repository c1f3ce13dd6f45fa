"""Structured logging: every line carries time, level, subsystem and pid.

Two formats:

* ``json`` - one JSON object per line, compatible with runc's ``--log-format json``
  (``level``, ``msg``, ``time``), which containerd's runc shim reads back to show
  errors; plus ``subsystem``, ``pid`` and any ids bound with :func:`bind`.
* ``logfmt`` (the default for humans, also what runc calls ``text``) -
  ``time=... level=info subsystem=hypervisor msg="..." sandbox=abc``.

Use ``get_logger("hypervisor")`` in a module; bind ids for a scope with
``with bind(sandbox=sid): ...``. Standard library only (the guest agent uses it).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

SUBSYSTEMS = frozenset(
    {
        "cli",
        "shim",
        "api",
        "hypervisor",
        "network",
        "storage",
        "devices",
        "agent",
        "protocol",
        "image",
        "config",
        "check",
        "monitor",
        "bench",
    }
)

_bound: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("cocoon_log_bound", default=None)

# Fields that logging.LogRecord has of its own; anything else passed in `extra` is ours.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Attach fields (sandbox=..., container=...) to every log line emitted in this context."""
    merged = dict(_bound.get() or {})
    merged.update({k: v for k, v in fields.items() if v is not None})
    token = _bound.set(merged)
    try:
        yield
    finally:
        _bound.reset(token)


def _rfc3339(created: float) -> str:
    secs = int(created)
    frac = int((created - secs) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:06d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": _rfc3339(record.created),
        "level": "warning" if record.levelname == "WARNING" else record.levelname.lower(),
        "subsystem": getattr(record, "subsystem", None) or record.name.removeprefix("cocoon.") or "cocoon",
        "pid": record.process,
        "msg": record.getMessage(),
    }
    for key, value in getattr(record, "bound", {}).items():
        out.setdefault(key, value)
    for key, value in record.__dict__.items():
        if key not in _RECORD_FIELDS and key not in ("subsystem", "bound") and not key.startswith("_"):
            out.setdefault(key, value)
    if record.exc_info and record.exc_info[1] is not None:
        out["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    return out


class JSONFormatter(logging.Formatter):
    """runc-compatible JSON lines (level, msg, time) plus subsystem, pid and bound ids."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str, separators=(",", ":"))


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return json.dumps(text)
    return text


class LogfmtFormatter(logging.Formatter):
    """key=value lines, same fields as JSON."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "bound"):
            record.bound = dict(_bound.get() or {})
        return True


class Logger(logging.LoggerAdapter[logging.Logger]):
    """A logger bound to one subsystem."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(kwargs.pop("extra", None) or {})
        extra.setdefault("subsystem", self.extra["subsystem"] if self.extra else "cocoon")
        # Any other keyword becomes a structured field: log.info("booted", ms=812)
        for key in list(kwargs):
            if key not in ("exc_info", "stack_info", "stacklevel"):
                extra[key] = kwargs.pop(key)
        kwargs["extra"] = extra
        return msg, kwargs


def get_logger(subsystem: str) -> Logger:
    """The logger of one subsystem (``cli``, ``hypervisor``, ``agent``, ...)."""
    return Logger(logging.getLogger(f"cocoon.{subsystem}"), {"subsystem": subsystem})


def setup(
    *,
    level: str | int = "info",
    fmt: str = "logfmt",
    path: str | os.PathLike[str] | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Configure the ``cocoon`` logger tree once per process; returns the handler installed.

    ``fmt`` is ``json``, ``logfmt`` or ``text`` (runc's name for the human format).
    With ``path`` lines are appended to that file (runc's ``--log``), else to ``stream``
    (stderr by default).
    """
    if fmt not in ("json", "logfmt", "text"):
        from cocoon.errors import InvalidArgument

        raise InvalidArgument("unknown log format", field="log-format", value=fmt)
    root = logging.getLogger("cocoon")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler: logging.Handler
    if path is not None:
        handler = logging.FileHandler(os.fspath(path), mode="a", encoding="utf-8", delay=False)
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else LogfmtFormatter())
    handler.addFilter(_ContextFilter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    root.propagate = False
    return handler
