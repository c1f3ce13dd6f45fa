"""The one error tree of Cocoon.

Every error Cocoon raises derives from :class:`CocoonError`. Each carries the
context a caller needs (ids, paths, commands, exit codes) as keyword
attributes, and renders as one line: ``<message> (key=value, ...)``.
Callers that add context while an error travels up use :meth:`CocoonError.add_context`
or wrap with ``raise XError("start vm", ...) from exc`` so the message reads like a
path through the system ("create sandbox: start vm: qemu exited").

This module imports only the standard library: the guest agent uses it too.

Tree::

    CocoonError
    ├── ConfigError            bad/missing configuration (file, key)
    ├── InvalidArgument        bad user input (field, value)
    ├── NotFound               a container, sandbox, file or binary that does not exist
    ├── AlreadyExists          an id that is already taken
    ├── StateError             a lifecycle transition that is not allowed (state, required)
    │   └── LockTimeout        another command holds the container's lock too long
    ├── CorruptState           a state.json that cannot be read back (id, file)
    ├── ProcessError           a helper process failed (command, exit_code, stderr)
    ├── ImageError             the guest image cannot be built or found
    ├── NetworkError           the pod's network cannot be found or wired (netns, interface, kind)
    ├── HypervisorError        the VMM failed
    │   └── BootError          the guest did not come up (console tail attached)
    ├── AgentError             the guest agent failed or answered an error
    │   └── AgentTimeout       the agent did not answer in time
    └── ProtocolError          (cocoon.protocol.ttrpc.errors) wire-level failures
"""

from __future__ import annotations

# `typing` costs ~4 ms to import; this module is on the path of `cocoon state`.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class CocoonError(Exception):
    """Base class of every Cocoon error; ``context`` holds key facts for logs and callers."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context: dict[str, Any] = {k: v for k, v in context.items() if v is not None}

    def add_context(self, **context: Any) -> CocoonError:
        """Attach more context (does not override keys already set) and return self."""
        for key, value in context.items():
            if value is not None:
                self.context.setdefault(key, value)
        return self

    def __getattr__(self, name: str) -> Any:
        # Context keys read as attributes (err.exit_code, err.path); missing ones are None.
        if name.startswith("__") or name in ("message", "context"):
            raise AttributeError(name)
        return self.__dict__.get("context", {}).get(name)

    def __str__(self) -> str:
        if not self.context:
            return self.message
        parts = []
        for key, value in self.context.items():
            if key == "console_tail":
                continue
            text = str(value)
            if len(text) > 200:
                text = text[:200] + "..."
            parts.append(f"{key}={text}")
        line = f"{self.message} ({', '.join(parts)})" if parts else self.message
        tail = self.context.get("console_tail")
        if tail:
            line += "\n--- guest console (last lines) ---\n" + str(tail)
        return line


class ConfigError(CocoonError):
    """The configuration file is missing, unreadable or holds a bad key or value."""


class InvalidArgument(CocoonError):
    """User input (an id, a flag, a field of config.json) is not acceptable."""


class NotFound(CocoonError):
    """Something named does not exist."""


class AlreadyExists(CocoonError):
    """An id is already in use."""


class StateError(CocoonError):
    """An operation is not allowed in the object's current lifecycle state."""


class CorruptState(CocoonError):
    """A state.json that cannot be read back (names ``id`` and ``file``)."""


class LockTimeout(StateError):
    """Another command holds the container's lock longer than the caller was willing to wait."""


class ProcessError(CocoonError):
    """A helper process could not be started or exited with an error."""


class ImageError(CocoonError):
    """The guest kernel or initrd cannot be found or built."""


class NetworkError(CocoonError):
    """The pod's network namespace holds something we cannot wire to the VM, or wiring failed."""


class HypervisorError(CocoonError):
    """The hypervisor (VMM) failed."""


class BootError(HypervisorError):
    """The guest did not reach a working agent; ``console_tail`` holds its last words."""


class AgentError(CocoonError):
    """The guest agent failed or returned an error."""


class AgentTimeout(AgentError):
    """The guest agent did not answer within its deadline."""
