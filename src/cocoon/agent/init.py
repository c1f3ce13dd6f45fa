"""Guest early init: what PID 1 does before serving the agent API. Standard library only.

:func:`setup` mounts the API filesystems and cgroup2, loads the kernel modules the image lists in
``/etc/cocoon/modules``, sets the hostname from the kernel command line and writes the basic
``/etc`` files. Every step is idempotent (a second call changes nothing) and logs one JSON line
(subsystem ``agent``) to the console with its duration. :func:`poweroff` ends the VM.

Pure logic (command line parsing, the mount table, the cgroup controller list) is kept in plain
functions so it is tested on the host without root or a VM.

Kernel command line parameters read here::

    cocoon.hostname=NAME     guest hostname (default "cocoon")
    cocoon.log=json|logfmt   log format on the console (default json)
    cocoon.log_level=LEVEL   debug, info (default), warning, error
    cocoon.modules=0         skip module loading (benchmarks, kernels with everything built in)
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cocoon import log as cocoon_log
from cocoon.agent import kmod
from cocoon.errors import CocoonError

log = cocoon_log.get_logger("agent")

MODULES_LIST = "/etc/cocoon/modules"
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_CONTROLLERS: tuple[str, ...] = ("cpuset", "cpu", "io", "memory", "pids")
DEFAULT_HOSTNAME = "cocoon"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# <sys/mount.h>
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_RELATIME = 0x2, 0x4, 0x8, 0x200000
MS_BIND, MS_MOVE, MS_REC = 0x1000, 0x2000, 0x4000
MNT_DETACH = 0x2
# Where attach_root binds the initramfs before moving it onto / (removed again right after).
ROOT_BIND_DIR = "/.cocoon-root"
# <linux/reboot.h>
RB_POWER_OFF = 0x4321FEDC
_NOSUID_NODEV = MS_NOSUID | MS_NODEV


@dataclass(frozen=True)
class Mount:
    """One entry of the early mount table (what mount(2) takes)."""

    source: str
    target: str
    fstype: str
    flags: int = 0
    data: str = ""
    mode: int = 0o755  # of the mount point, when it has to be created


MOUNTS: tuple[Mount, ...] = (
    Mount("proc", "/proc", "proc", _NOSUID_NODEV | MS_NOEXEC),
    Mount("sysfs", "/sys", "sysfs", _NOSUID_NODEV | MS_NOEXEC),
    Mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    Mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
    Mount("shm", "/dev/shm", "tmpfs", _NOSUID_NODEV, "mode=1777", 0o1777),
    Mount("tmpfs", "/run", "tmpfs", _NOSUID_NODEV, "mode=0755"),
    Mount("tmpfs", "/tmp", "tmpfs", _NOSUID_NODEV, "mode=1777", 0o1777),
    Mount("cgroup2", CGROUP_ROOT, "cgroup2", _NOSUID_NODEV | MS_NOEXEC | MS_RELATIME, "nsdelegate"),
)

DEV_LINKS: tuple[tuple[str, str], ...] = (
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
    ("/dev/ptmx", "pts/ptmx"),
)


def parse_cmdline(text: str) -> dict[str, str]:
    """Kernel command line -> {key: value}; bare flags map to ""; later keys win.

    Follows the kernel's rules: words split on whitespace, double quotes group (and are
    dropped), everything after a lone ``--`` belongs to init and is ignored here.
    """
    out: dict[str, str] = {}
    for word in _split_cmdline(text):
        if word == "--":
            break
        key, sep, value = word.partition("=")
        out[key] = value if sep else ""
    return out


def _split_cmdline(text: str) -> Iterator[str]:
    word: list[str] = []
    quoted = False
    started = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            started = True
        elif ch.isspace() and not quoted:
            if started:
                yield "".join(word)
            word, started = [], False
        else:
            word.append(ch)
            started = True
    if started:
        yield "".join(word)


def valid_hostname(name: str) -> bool:
    """RFC 1123 host name: labels of [a-z0-9-], not starting/ending with '-', <= 64 chars."""
    if not name or len(name) > 64:
        return False
    for label in name.split("."):
        if not label or label[0] == "-" or label[-1] == "-":
            return False
        if not all(c.isascii() and (c.isalnum() or c == "-") for c in label):
            return False
    return True


def enabled_controllers(available: str, wanted: tuple[str, ...] = CGROUP_CONTROLLERS) -> list[str]:
    """The ``wanted`` controllers present in a ``cgroup.controllers`` line, in wanted order."""
    have = set(available.split())
    return [c for c in wanted if c in have]


def hosts_file(hostname: str) -> str:
    """Contents of /etc/hosts for ``hostname``."""
    return (f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"127.0.1.1\t{hostname}\n")


class _Libc:
    """mount(2) and reboot(2) through ctypes, loaded on first use."""

    _lib: object | None = None

    @classmethod
    def call(cls, name: str, *args: object) -> None:
        import ctypes

        if cls._lib is None:
            cls._lib = ctypes.CDLL(None, use_errno=True)
        rc = getattr(cls._lib, name)(*args)
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{name}: {os.strerror(err)}")


def _step(name: str, fn: Callable[[], object], **fields: Any) -> object:
    t0 = time.monotonic()
    try:
        result = fn()
    except (OSError, CocoonError) as exc:
        log.error(f"{name} failed", step=name, error=str(exc), **fields)
        return None
    if isinstance(result, dict):
        fields = {**result, **fields}
    log.info(name, step=name, ms=round((time.monotonic() - t0) * 1000, 1), **fields)
    return result


def do_mount(m: Mount) -> bool:
    """Mount ``m`` unless something is mounted there already; True if it mounted now."""
    if os.path.ismount(m.target):
        return False
    os.makedirs(m.target, mode=m.mode, exist_ok=True)
    _Libc.call("mount", m.source.encode(), m.target.encode(), m.fstype.encode(), m.flags,
               m.data.encode() if m.data else None)
    return True


def mount_all(mounts: tuple[Mount, ...] = MOUNTS,
              links: tuple[tuple[str, str], ...] = DEV_LINKS) -> list[str]:
    """Mount the early filesystems in order; returns the targets mounted now."""
    done = []
    for m in mounts:
        try:
            if do_mount(m):
                done.append(m.target)
        except OSError as exc:
            if m.fstype == "cgroup2" and exc.errno == errno.EBUSY:
                continue
            raise CocoonError("mount failed", target=m.target, fstype=m.fstype, error=str(exc)) from exc
    for link, target in links:
        if not os.path.lexists(link):
            os.symlink(target, link)
    return done


def root_is_detached(mountinfo: str) -> bool:
    """True when the visible ``/`` in /proc/self/mountinfo text is the kernel's rootfs itself.

    rootfs is its own parent (mount id == parent id), and pivot_root(2) refuses to move a root
    that is not attached to a parent (EINVAL): crun could only chroot (``--no-pivot``).
    """
    root: list[str] = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/":
            root = fields  # the last mount on / is the visible one
    return bool(root) and root[0] == root[1]


def attach_root(mountinfo: str = "/proc/self/mountinfo", *, release: tuple[str, ...] = ()) -> dict[str, bool]:
    """Make ``/`` a mount with a parent, so that crun can pivot_root(2) away from it.

    What switch_root does, minus the copy: bind the initramfs onto a directory of itself, move
    that bind onto ``/`` and chroot into it. The files stay where the kernel unpacked them (no
    copy into a tmpfs: microseconds instead of copying 25 MB under TCG); the rootfs below is
    covered by the bind, and a container's root is then a real pivot_root, so a chroot escape
    inside a container no longer reaches the agent's files. ``release``: mount points to detach
    first (they would stay behind, hidden, under the bind). Idempotent.
    """
    with open(mountinfo) as f:
        if not root_is_detached(f.read()):
            return {"attached": False}
    for target in release:
        _Libc.call("umount2", target.encode(), MNT_DETACH)
    os.mkdir(ROOT_BIND_DIR, 0o700)
    _Libc.call("mount", b"/", ROOT_BIND_DIR.encode(), None, MS_BIND | MS_REC, None)
    os.chdir(ROOT_BIND_DIR)
    _Libc.call("mount", b".", b"/", None, MS_MOVE, None)
    os.chroot(".")
    os.chdir("/")
    os.rmdir(ROOT_BIND_DIR)  # the same directory, now an empty one of the bind
    return {"attached": True}


def _attach_root_step() -> dict[str, bool]:
    # /proc tells whether / is rootfs; the proc mounted just for that is released before the bind.
    proc = MOUNTS[0]
    mounted = do_mount(proc)
    return attach_root(release=(proc.target,) if mounted else ())


def enable_cgroup_controllers(root: str = CGROUP_ROOT) -> list[str]:
    """Delegate the wanted controllers to child cgroups of the root; returns what is enabled."""
    with open(f"{root}/cgroup.controllers") as f:
        controllers = enabled_controllers(f.read())
    with open(f"{root}/cgroup.subtree_control") as f:
        already = set(f.read().split())
    todo = [c for c in controllers if c not in already]
    if todo:
        with open(f"{root}/cgroup.subtree_control", "w") as f:
            f.write(" ".join(f"+{c}" for c in todo))
    return controllers


def machine_buses(sys_bus: str = "/sys/bus") -> tuple[bool, bool]:
    """(has a PCI bus with devices, has virtio-mmio devices) as the kernel sees them now."""
    def listing(path: str) -> list[str]:
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []

    has_pci = bool(listing(f"{sys_bus}/pci/devices"))
    # virtio-mmio devices come from ACPI (LNRO0005) on microvm, or from the command line.
    has_mmio = any(d.startswith(("LNRO0005", "virtio-mmio")) for d in listing(f"{sys_bus}/platform/devices"))
    return has_pci, has_mmio


def load_modules(list_path: str = MODULES_LIST, *, early: bool | None = None) -> dict[str, int]:
    """Load the modules of ``list_path`` in order (``early``: see :func:`kmod.select`).

    Transports for buses the machine lacks are skipped. Returns counts loaded/present/failed/skipped.
    """
    counts = {"loaded": 0, "present": 0, "failed": 0, "skipped": 0}
    try:
        with open(list_path) as f:
            listed = kmod.read_list(f.read())
    except FileNotFoundError:
        return counts
    has_pci, has_mmio = machine_buses()
    paths = kmod.select(listed, early=early, has_pci=has_pci, has_mmio=has_mmio)
    counts["skipped"] = len(kmod.select(listed, early=early)) - len(paths)
    for path in paths:
        name = kmod.module_name(path)
        if kmod.is_loaded(name):
            counts["present"] += 1
            continue
        try:
            counts["loaded" if kmod.load(path) else "present"] += 1
        except CocoonError as exc:
            counts["failed"] += 1
            log.error("module load failed", step="modules", kmod=name, error=str(exc))
    return counts


def set_hostname(name: str) -> str:
    """Set the kernel hostname and write /etc/hostname and /etc/hosts."""
    if socket.gethostname() != name:
        socket.sethostname(name)
    _write_if_changed("/etc/hostname", name + "\n")
    _write_if_changed("/etc/hosts", hosts_file(name))
    if not os.path.exists("/etc/resolv.conf"):
        _write_if_changed("/etc/resolv.conf", "")
    return name


def _write_if_changed(path: str, text: str) -> None:
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_cmdline(path: str = "/proc/cmdline") -> dict[str, str]:
    """The parsed kernel command line ({} when /proc is not there)."""
    try:
        with open(path) as f:
            return parse_cmdline(f.read())
    except FileNotFoundError:
        return {}


def setup(*, defer_modules: bool = False) -> dict[str, str]:
    """Bring the guest up to where the agent can serve; returns the parsed kernel command line.

    With ``defer_modules`` only the modules the agent channel needs are loaded; the caller
    loads the rest later with ``load_modules(early=False)`` (e.g. in a thread once it answers).
    """
    t0 = time.monotonic()
    os.environ["PATH"] = GUEST_PATH
    os.environ.setdefault("HOME", "/root")
    os.umask(0o022)
    # Mount first: /proc/cmdline tells how to log.
    mounted_err: str | None = None
    attached: bool | str = False
    try:
        attached = _attach_root_step()["attached"]
    except OSError as exc:  # containers then fail at crun create (pivot_root): say why here
        attached = f"failed: {exc}"
    try:
        mounted = mount_all()
    except CocoonError as exc:
        mounted, mounted_err = [], str(exc)
    cmdline = read_cmdline()
    if not logging.getLogger("cocoon").handlers:
        fmt = cmdline.get("cocoon.log", "json")
        level = cmdline.get("cocoon.log_level", "info").lower()
        cocoon_log.setup(level=level if level in ("debug", "info", "warning", "error") else "info",
                         fmt=fmt if fmt in ("json", "logfmt") else "json")
    if mounted_err:
        log.error("mount failed", step="mount", error=mounted_err)
    else:
        log.info("mount", step="mount", mounted=",".join(mounted), root_attached=attached,
                 ms=round((time.monotonic() - t0) * 1000, 1))
    if cmdline.get("cocoon.modules", "1") not in ("0", "off", "no"):
        _step("modules", lambda: load_modules(early=True if defer_modules else None))
    _step("cgroup", enable_cgroup_controllers)
    name = cmdline.get("cocoon.hostname", DEFAULT_HOSTNAME)
    if not valid_hostname(name):
        log.warning("bad hostname on kernel command line", step="hostname", value=name)
        name = DEFAULT_HOSTNAME
    _step("hostname", lambda: set_hostname(name), hostname=name)
    log.info("init done", step="done", ms=round((time.monotonic() - t0) * 1000, 1),
             uptime=_uptime())
    return cmdline


def _uptime() -> float | None:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def reap_children() -> list[tuple[int, int]]:
    """Collect every exited child without blocking: [(pid, exit code or -signal)]."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        out.append((pid, os.waitstatus_to_exitcode(status)))
    return out


def poweroff() -> None:
    """Flush file systems and power the VM off (never returns when it works)."""
    os.sync()
    _Libc.call("reboot", RB_POWER_OFF)


AGENT_MARKER = "COCOON-AGENT-READY"
# Imported by probe() to show the guest python can load the agent's dependencies.
PROBE_IMPORTS: tuple[str, ...] = ("google.protobuf.message", "cocoon.agent.main")


def probe(imports: tuple[str, ...] = PROBE_IMPORTS) -> None:
    """Image boot test as PID 1: :func:`setup`, import the agent's stack, print the marker, power off."""
    import importlib
    import sys

    try:
        setup()
        for name in imports:
            t0 = time.monotonic()
            importlib.import_module(name)
            log.info("probe import", step="probe", target=name, ms=round((time.monotonic() - t0) * 1000, 1))
        log.info("probe ready", step="probe", protobuf=_protobuf_impl(), uptime=_uptime(),
                 ports=",".join(f"{n}={d}" for n, d in sorted(virtio_ports().items())))
        print(AGENT_MARKER, file=sys.stderr, flush=True)
    except Exception as exc:  # PID 1: say what broke before the VM goes away
        log.error("probe failed", step="probe", error=f"{type(exc).__name__}: {exc}")
    finally:
        poweroff()


def virtio_ports(sys_class: str = "/sys/class/virtio-ports") -> dict[str, str]:
    """Named virtio-serial ports: {name: /dev/vportXpY}."""
    out = {}
    try:
        entries = sorted(os.listdir(sys_class))
    except FileNotFoundError:
        return {}
    for dev in entries:
        try:
            with open(f"{sys_class}/{dev}/name") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name:
            out[name] = f"/dev/{dev}"
    return out


def _protobuf_impl() -> str:
    try:
        from google.protobuf.internal import api_implementation
    except ImportError:
        return "none"
    return str(api_implementation.Type())
