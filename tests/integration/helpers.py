"""Plumbing for the integration tests: commands, a pty runner, /proc scans, daemon processes.

Nothing here knows about a particular engine; conftest.py builds the engines from these pieces.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VMM_NAMES = ("qemu-system", "virtiofsd")
IMAGE = "localhost/cocoon-busybox:latest"  # built by conftest's image_archive, loaded into every engine
NAMESPACE = "cocoon-test"  # containerd namespace of the tests


def cocoon_binary() -> str | None:
    """The runtime the engines are pointed at: $COCOON_BIN, /usr/local/bin/cocoon or the venv's."""
    for candidate in (os.environ.get("COCOON_BIN"), "/usr/local/bin/cocoon", str(REPO / ".venv" / "bin" / "cocoon")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_binaries(*names: str) -> list[str]:
    return [name for name in names if shutil.which(name) is None]


@dataclass(repr=False)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __repr__(self) -> str:
        return f"{' '.join(self.argv)}\n-> rc={self.returncode}\nstdout: {self.stdout!r}\nstderr: {self.stderr!r}"

    __str__ = __repr__


def run(argv: Sequence[str], *, timeout: float = 120, env: dict[str, str] | None = None, check: bool = False,
        stdin: int | None = subprocess.DEVNULL) -> Result:  # fmt: skip
    """Run a client command; a timeout kills its process group and fails with what it printed.

    Output is decoded without newline translation: a terminal's CR LF stays visible.
    """
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout}s: {' '.join(argv)}\nstdout: {out!r}\nstderr: {err!r}"
        ) from None
    res = Result(list(argv), proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
    if check:
        assert res.returncode == 0, str(res)
    return res


def run_in_pty(argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None,
               give_up: Callable[[], str | None] | None = None) -> Result:  # fmt: skip
    """Run ``argv`` with a fresh pty as its controlling terminal and stdio (what ``-t`` clients want).

    Returns everything written to the terminal as ``stdout``. On timeout, or as soon as
    ``give_up()`` returns a reason, the process group is killed and AssertionError carries the
    reason and the output so far.
    """
    master, slave = pty.openpty()
    proc = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                            preexec_fn=_make_controlling_tty)  # noqa: PLW1509  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            reason = f"timed out after {timeout}s" if left <= 0 else (give_up() if give_up else None)
            if reason:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                text = b"".join(chunks).decode(errors="replace")
                raise AssertionError(f"{reason}: {' '.join(argv)}\nterminal: {text!r}")
            ready, _, _ = select.select([master], [], [], min(left, 0.5))
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError as exc:  # EIO: every slave fd is closed
                    if exc.errno != errno.EIO:
                        raise
                    data = b""
                if not data:
                    break
                chunks.append(data)
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
    return Result(list(argv), rc, b"".join(chunks).decode(errors="replace"), "")


def _make_controlling_tty() -> None:
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something true; AssertionError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# -- /proc ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    argv: tuple[str, ...]

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv)


def processes() -> dict[int, Proc]:
    """Every live (non-zombie) process with a command line."""
    found: dict[int, Proc] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if not raw or fields[0] in ("Z", "X"):
            continue  # zombies hold nothing; reaping them is their parent's job
        argv = tuple(a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0"))
        found[int(entry.name)] = Proc(int(entry.name), int(fields[1]), fields[0], argv)
    return found


def is_vmm(p: Proc) -> bool:
    return any(name in Path(p.argv[0]).name for name in VMM_NAMES)


def is_cocoon(p: Proc) -> bool:
    """A cocoon process (the monitor forked by ``create`` keeps create's command line), or a shim."""
    return any(Path(a).name == "cocoon" for a in p.argv[:2]) or "cocoon.shim" in p.argv[:3]


def ours(markers: Iterable[str]) -> dict[int, Proc]:
    """qemu/virtiofsd/cocoon processes whose command line names one of ``markers`` (our state dirs)."""
    marks = tuple(markers)
    return {pid: p for pid, p in processes().items()
            if (is_vmm(p) or is_cocoon(p)) and any(m in p.cmdline for m in marks)}  # fmt: skip


def kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def containers_in(root: str | os.PathLike[str]) -> set[str]:
    """Container ids, socket dirs (``~sock/<hash>``), ``~sock`` itself (removed with the last container)
    and half-deleted directories (``~deleting.*``) under a cocoon state root."""
    base = Path(root)
    if not base.is_dir():
        return set()
    names = {p.name for p in base.iterdir()}
    sock = base / "~sock"
    if sock.is_dir():
        names |= {f"~sock/{p.name}" for p in sock.iterdir()}
    return names


def cocoon_status(root: str | os.PathLike[str], cid: str) -> str | None:
    """The status cocoon recorded for ``cid`` (state.json), None when it has no state."""
    try:
        return str(json.loads((Path(root) / cid / "state.json").read_text()).get("status"))
    except (OSError, ValueError):
        return None


def mounts_below(base: str | os.PathLike[str]) -> list[str]:
    prefix = str(base).rstrip("/") + "/"
    out = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            target = line.split()[1].replace("\\040", " ")
            if target.startswith(prefix) or target == prefix.rstrip("/"):
                out.append(target)
    return out


def unmount_below(base: str | os.PathLike[str]) -> None:
    for target in sorted(mounts_below(base), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def last_error_line(log_json: Path) -> dict | None:
    """The last ``level: error`` line of a runc-style JSON log (what containerd's shim reports)."""
    last = None
    with contextlib.suppress(OSError):
        for line in log_json.read_text().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and obj.get("level") == "error":
                    last = obj
    return last


# -- daemons ------------------------------------------------------------------------------------------
@dataclass
class Daemon:
    """A daemon in its own session, its output in ``log``."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)  # fmt: skip

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL its process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def descendants_and_marked(marker: str) -> list[Proc]:
    """Every live process whose command line contains ``marker`` (shims, a daemon's own containerd)."""
    me = os.getpid()
    return [p for p in processes().values() if p.pid != me and marker in p.cmdline]


class StuckInCreated:
    """``give_up`` for a client that should start a container: the runtime said "created" long ago."""

    def __init__(self, root: str | os.PathLike[str], cid: str, patience: float = 20.0) -> None:
        self.root, self.cid, self.patience = root, cid, patience
        self.since: float | None = None

    def __call__(self) -> str | None:
        if cocoon_status(self.root, self.cid) != "created":
            self.since = None
            return None
        if self.since is None:
            self.since = time.monotonic()
        if time.monotonic() - self.since > self.patience:
            fds = _stdio_of(_state_pid(self.root, self.cid))
            return (
                f"cocoon reported {self.cid} 'created' {self.patience:.0f}s ago but the client never "
                f"called start (its create call did not return); the monitor's stdio: {fds}"
            )
        return None


def _state_pid(root: str | os.PathLike[str], cid: str) -> int:
    try:
        return int(json.loads((Path(root) / cid / "state.json").read_text()).get("pid") or 0)
    except (OSError, ValueError):
        return 0


def _stdio_of(pid: int) -> dict[int, str]:
    out = {}
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out
