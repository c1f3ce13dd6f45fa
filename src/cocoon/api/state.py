"""Container state on disk: one directory per container under the root (``/run/cocoon``).

Layout (see docs/state.md)::

    <root>/                      0700, made on the first create
        <id>/                    0700; mkdir is the atomic claim of the id
            state.json           the ContainerState, replaced atomically (temp + fsync + rename + fsync dir)
            lock                 flock(2) target: one command at a time per container
        ~sock/<short_hash(id)>/  sockets of that container (unix socket paths must stay < 108 bytes)

Names that are not valid ids (``~sock``, ``~deleting.*``) can never collide with a container.

Readers never lock: a rename is atomic, so a reader sees the old or the new state, never a torn one.
Writers (every command that changes a container) hold :meth:`StateStore.lock` around load-modify-save.

This module is on the path of ``cocoon state``/``cocoon list``: standard library only, nothing heavy.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import time
from collections.abc import Iterator

from cocoon.api.ids import is_valid_id, short_hash, validate_id
from cocoon.errors import AlreadyExists, CorruptState, LockTimeout, NotFound, StateError
from cocoon.oci.defaults import OCI_VERSION
from cocoon.util.fs import write_atomic

# `typing` costs ~4 ms to import; this module is on the path of `cocoon state`.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_ROOT = "/run/cocoon"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
SOCKET_DIR = "~sock"
SCHEMA = 1  # version of state.json's layout, written as "schema"


# --- Status --------------------------------------------------------------------------------------


class Status(enum.StrEnum):
    """The OCI lifecycle states; ``can_*`` say what a command may do in each (as runc's CLI allows)."""

    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"

    def can_start(self) -> bool:
        return self in _ACTIONS["start"]

    def can_kill(self) -> bool:
        return self in _ACTIONS["kill"]

    def can_delete(self) -> bool:
        """Without --force: stopped, or created (it never ran; runc deletes it too)."""
        return self in _ACTIONS["delete"]

    def can_exec(self) -> bool:
        return self in _ACTIONS["exec"]

    def can_pause(self) -> bool:
        return self in _ACTIONS["pause"]

    def can_resume(self) -> bool:
        return self in _ACTIONS["resume"]

    def require(self, action: str, *, id: str | None = None) -> None:
        """Raise StateError unless ``action`` (start, kill, delete, exec, pause, resume) is allowed now."""
        allowed = _ACTIONS.get(action)
        if allowed is None:
            raise ValueError(f"unknown action {action!r}")
        if self not in allowed:
            raise StateError(
                f"cannot {action} container: it is {self}", id=id, state=str(self), required=_either(allowed)
            )

    def transition(self, to: Status) -> Status:
        """Return ``to`` if the lifecycle allows going there from here, else raise StateError."""
        if to not in _NEXT[self]:
            sources = [s for s in Status if to in _NEXT[s]]
            raise StateError(
                f"cannot go from {self} to {to}", state=str(self), required=_either(sources) if sources else "none"
            )
        return to


_NEXT: dict[Status, frozenset[Status]] = {
    Status.CREATING: frozenset({Status.CREATED, Status.STOPPED}),
    Status.CREATED: frozenset({Status.RUNNING, Status.STOPPED}),
    Status.RUNNING: frozenset({Status.PAUSED, Status.STOPPED}),
    Status.PAUSED: frozenset({Status.RUNNING, Status.STOPPED}),
    Status.STOPPED: frozenset(),
}

_ACTIONS: dict[str, frozenset[Status]] = {
    "start": frozenset({Status.CREATED}),
    "kill": frozenset({Status.CREATED, Status.RUNNING, Status.PAUSED}),
    "delete": frozenset({Status.CREATED, Status.STOPPED}),
    "exec": frozenset({Status.CREATED, Status.RUNNING}),  # runc refuses paused without --ignore-paused
    "pause": frozenset({Status.RUNNING}),
    "resume": frozenset({Status.PAUSED}),
}


def _either(states: Any) -> str:
    names = [str(s) for s in Status if s in states]  # in lifecycle order
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# --- ContainerState ------------------------------------------------------------------------------


def rfc3339_nano(ns: int) -> str:
    """UTC time as Go's RFC3339Nano (what runc prints): trailing zeros of the fraction dropped."""
    secs, frac = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def _owner_name(uid: int) -> str:
    import pwd  # a C module: cheap, and only create pays for it

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"  # as runc shows a uid without a name


# state.json's keys, in the order they are written.
_FIELDS = (
    "id", "bundle", "status", "pid", "pid_start_time", "created", "annotations", "owner", "rootfs",
    "oci_version", "config_sha", "sandbox_id", "monitor_socket", "started_at", "finished_at", "exit_code",
)  # fmt: skip


class ContainerState:  # noqa: PLW1641 - mutable, so unhashable (defining __eq__ sets __hash__ = None)
    """What Cocoon remembers of one container between commands (the content of state.json).

    ``pid`` is the host process standing for the container (stand-in or monitor) and
    ``pid_start_time`` its start time (clock ticks after boot, /proc/PID/stat), which detects PID
    reuse. ``created``, ``started_at``, ``finished_at`` are RFC3339 UTC with nanoseconds.
    ``oci_version`` and ``config_sha`` (sha256) describe the config.json it was made from;
    ``sandbox_id`` is the VM it runs in and ``monitor_socket`` that VM's monitor's control socket.

    A plain slotted class rather than a dataclass: importing ``dataclasses`` (it pulls in
    ``inspect``) costs more than everything else on the path of ``cocoon state``. Use
    :meth:`replace` where ``dataclasses.replace`` would be used.
    """

    __slots__ = _FIELDS

    def __init__(
        self,
        id: str,
        bundle: str,
        *,
        status: Status = Status.CREATING,
        pid: int = 0,
        pid_start_time: int = 0,
        created: str = "",
        annotations: dict[str, str] | None = None,
        owner: str = "",
        rootfs: str = "",
        oci_version: str = OCI_VERSION,
        config_sha: str = "",
        sandbox_id: str = "",
        monitor_socket: str = "",
        started_at: str = "",
        finished_at: str = "",
        exit_code: int | None = None,
    ) -> None:
        self.id = id
        self.bundle = bundle
        self.status = status
        self.pid = pid
        self.pid_start_time = pid_start_time
        self.created = created
        self.annotations = dict(annotations) if annotations else {}
        self.owner = owner
        self.rootfs = rootfs
        self.oci_version = oci_version
        self.config_sha = config_sha
        self.sandbox_id = sandbox_id
        self.monitor_socket = monitor_socket
        self.started_at = started_at
        self.finished_at = finished_at
        self.exit_code = exit_code

    @classmethod
    def new(cls, id: str, bundle: str, **kw: Any) -> ContainerState:
        """A state for ``create``: status creating, ``created`` now, owner the effective user."""
        kw.setdefault("created", rfc3339_nano(time.time_ns()))
        kw.setdefault("owner", _owner_name(os.geteuid()))
        return cls(id, bundle, **kw)

    def replace(self, **changes: Any) -> ContainerState:
        """A copy with some fields changed (the input is left as it is)."""
        kw = {name: getattr(self, name) for name in self.__slots__}
        kw.update(changes)
        return ContainerState(**kw)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ContainerState):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"ContainerState({inner})"

    def _runc_view(self, owner: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ociVersion": self.oci_version,
            "id": self.id,
            "pid": 0 if self.status is Status.STOPPED else self.pid,
            "status": str(self.status),
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
        }
        if self.annotations:  # Go's omitempty
            out["annotations"] = dict(self.annotations)
        out["owner"] = owner
        return out

    def to_oci_state(self) -> dict[str, Any]:
        """Exactly what ``runc state`` prints (runc leaves ``owner`` empty there; so do we)."""
        return self._runc_view("")

    def to_list_entry(self) -> dict[str, Any]:
        """One element of ``runc list -f json``: the same keys, with the owner filled in."""
        return self._runc_view(self.owner)

    def to_dict(self) -> dict[str, Any]:
        """The state.json document."""
        out: dict[str, Any] = {"schema": SCHEMA}
        for name in self.__slots__:
            value = getattr(self, name)
            out[name] = str(value) if name == "status" else value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> ContainerState:
        """Read a state.json document back; unknown keys are ignored (a newer Cocoon may add some).

        Raises ValueError (naming the key) on a wrong type or a missing ``id``/``bundle``.
        """
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        for name in ("id", "bundle"):
            if name not in data:
                raise ValueError(f"{name}: missing")
        kw = {name: _check(name, data[name]) for name in cls.__slots__ if name in data}
        return cls(**kw)


_TYPES: dict[str, type] = {"pid": int, "pid_start_time": int, "annotations": dict}


def _check(name: str, value: Any) -> Any:
    if name == "status":
        try:
            return Status(value)
        except ValueError:
            raise ValueError(f"status: unknown status {value!r}") from None
    if name == "exit_code":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError("exit_code: expected an integer or null")
        return value
    want = _TYPES.get(name, str)
    if isinstance(value, bool) or not isinstance(value, want):
        raise ValueError(f"{name}: expected {want.__name__}, got {type(value).__name__}")
    if isinstance(value, dict) and not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{name}: expected strings")
    return value


def _read_state(path: str, cid: str) -> ContainerState:
    """Parse one state.json; FileNotFoundError passes through, anything else is CorruptState."""
    try:
        with open(path, "rb") as f:
            state = ContainerState.from_dict(json.loads(f.read()))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptState(f"corrupt state file: {exc}", id=cid, file=path) from None
    if state.id != cid:
        raise CorruptState(f"state file belongs to {state.id!r}", id=cid, file=path)
    return state


# --- Liveness ------------------------------------------------------------------------------------


def _parse_start_time(stat_line: str) -> int | None:
    # comm (field 2) may hold spaces and ')': split after the last ')'. Then state is field 3 and
    # starttime field 22, i.e. index 19 of what follows.
    rest = stat_line.rsplit(")", 1)[-1].split()
    if len(rest) < 20 or rest[0] in ("Z", "X"):  # a zombie has exited: the container is gone
        return None
    return int(rest[19])


def process_start_time(pid: int) -> int | None:
    """Start time of a live process (clock ticks after boot), or None if it is gone or a zombie."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return _parse_start_time(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return None


def refresh_status(state: ContainerState) -> ContainerState:
    """The state as it really is: created/running/paused whose process is gone (or whose pid now
    belongs to another process) reads as stopped. Returns ``state`` itself when nothing changed.

    A VM that died under a running container therefore shows as stopped, as runc shows a container
    whose init died. Nothing is written: a caller that wants to persist it saves under the lock.
    """
    watched = state.status in (Status.CREATED, Status.RUNNING, Status.PAUSED) or (
        state.status is Status.CREATING and state.pid > 0
    )
    if not watched:
        return state
    started = process_start_time(state.pid)
    if started is None or (state.pid_start_time and started != state.pid_start_time):
        return state.replace(status=Status.STOPPED)
    return state


# --- The store -----------------------------------------------------------------------------------


def _fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateStore:
    """The containers under one root directory; every id is validated before a path is built.

    Paths are plain strings (``pathlib`` is not imported on the ``cocoon state`` path).
    """

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_ROOT) -> None:
        # No disk access here: `cocoon list` on a fresh host must not create the root.
        self.root = os.path.abspath(root)

    def dir(self, id: str) -> str:
        """The container's directory (not created)."""
        return os.path.join(self.root, validate_id(id))

    def socket_dir(self, id: str) -> str:
        """A short per-container directory for unix sockets (see :meth:`make_socket_dir`; removed by delete)."""
        return os.path.join(self.root, SOCKET_DIR, short_hash(validate_id(id)))

    def make_socket_dir(self, id: str) -> str:
        """Create the container's socket directory (mode 0700) if needed; its path.

        ``delete`` removes the shared parent (``~sock``) once it is empty, so it may vanish between
        our two mkdirs: then both are made again. Once ours is inside, the parent is not empty and
        stays.
        """
        path = self.socket_dir(id)
        parent = os.path.dirname(path)
        self._ensure_root()
        for _ in range(100):
            with contextlib.suppress(FileExistsError):
                os.mkdir(parent, 0o700)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                return path
            except FileNotFoundError:
                continue  # a concurrent last delete removed the empty parent
            return path
        raise StateError("cannot create the socket directory", id=id, path=path)

    def exists(self, id: str) -> bool:
        return os.path.isdir(self.dir(id))

    def _ensure_root(self) -> None:
        try:
            os.makedirs(self.root, mode=0o700)
        except FileExistsError:
            return  # an existing root keeps the mode its owner gave it
        os.chmod(self.root, 0o700)  # mkdir's mode is filtered by the umask

    def create(self, state: ContainerState) -> None:
        """Claim ``state.id`` and write its first state; AlreadyExists if the id is taken.

        ``mkdir`` is the atomic claim: a second create of the same id fails before writing anything,
        so it can never disturb the existing container (even a half-created one).
        """
        path = self.dir(state.id)
        self._ensure_root()
        try:
            os.mkdir(path, mode=0o700)
        except FileExistsError:
            raise AlreadyExists("container already exists", id=state.id) from None
        try:
            self.save(state)
            _fsync_dir(self.root)
        except BaseException:
            import shutil

            shutil.rmtree(path, ignore_errors=True)  # ours: mkdir succeeded
            raise

    def load(self, id: str) -> ContainerState:
        """The recorded state (see :func:`refresh_status` for the live one); NotFound if absent."""
        path = self.dir(id)
        try:
            return _read_state(os.path.join(path, STATE_FILE), id)
        except FileNotFoundError:
            if os.path.isdir(path):
                raise NotFound("container has no state yet (being created, or creation died)", id=id) from None
            raise NotFound("container does not exist", id=id) from None

    def save(self, state: ContainerState) -> None:
        """Replace the state atomically: temp file in the same dir, fsync, rename, fsync the dir.

        A crash at any point leaves either the old or the new state.json, never a torn one.
        NotFound if the container was deleted: a save never brings it back.
        """
        path = self.dir(state.id)
        data = json.dumps(state.to_dict(), separators=(",", ":")).encode()
        try:
            write_atomic(os.path.join(path, STATE_FILE), data)
        except FileNotFoundError:
            if not os.path.isdir(path):
                raise NotFound("container does not exist", id=state.id) from None
            raise
        _fsync_dir(path)

    def delete(self, id: str) -> None:
        """Remove the container's directory and sockets; NotFound if it does not exist.

        The directory is first renamed to a name no id can have, so readers see it vanish at once
        and a crash half-way through the removal leaves nothing that looks like a container.
        """
        import shutil

        path = self.dir(id)
        doomed = os.path.join(self.root, f"~deleting.{short_hash(id)}.{os.getpid()}.{time.monotonic_ns()}")
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            raise NotFound("container does not exist", id=id) from None
        shutil.rmtree(doomed, ignore_errors=True)
        sockets = self.socket_dir(id)
        shutil.rmtree(sockets, ignore_errors=True)
        # The last one out removes the parent; rmdir refuses a parent another container still uses
        # (and make_socket_dir copes with it vanishing under a concurrent create).
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(sockets))

    def list(self) -> list[ContainerState]:
        """Every container, sorted by id, as recorded (one small read each).

        Directories without a readable state (being created, being deleted, corrupt) are skipped;
        a corrupt one is logged.
        """
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            if not is_valid_id(entry.name):
                continue
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                out.append(_read_state(os.path.join(entry.path, STATE_FILE), entry.name))
            except FileNotFoundError:
                continue
            except CorruptState as exc:
                from cocoon.log import get_logger

                get_logger("api").warning("skipping container with a corrupt state", error=str(exc))
        out.sort(key=lambda s: s.id)
        return out

    @contextlib.contextmanager
    def lock(self, id: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the container's exclusive lock (flock) for the duration of the block.

        ``timeout`` None waits as long as it takes; else LockTimeout after that many seconds.
        NotFound if the container does not exist, or was deleted while we waited.
        """
        path = os.path.join(self.dir(id), LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise NotFound("container does not exist", id=id) from None
        try:
            _flock(fd, id, timeout)
            # delete renames the directory away: the file we locked is then no longer at `path`.
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is None or (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                raise NotFound("container was deleted", id=id)
            yield
        finally:
            os.close(fd)  # releases the lock


def _flock(fd: int, cid: str, timeout: float | None) -> None:
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(
                    "container is busy: another command holds its lock", id=cid, timeout=timeout
                ) from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)
