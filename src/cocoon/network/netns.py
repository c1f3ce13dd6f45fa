"""Doing things inside a network namespace given by path, without moving the caller.

``setns(2)`` changes the network namespace of the calling *thread* only. Every operation that
must happen inside the pod's namespace (opening a netlink socket, creating a tap with
``/dev/net/tun``) runs in a short-lived thread of its own that joins the namespace, does one
thing and exits: the main thread (and the event loop) never leave the host's namespace. A
netlink socket or a tap fd made there stays bound to that namespace after the thread is gone.
``os.setns`` is Python 3.12+, so libc's ``setns`` through ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from cocoon.errors import InvalidArgument, NetworkError, NotFound

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16



@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_in_netns(path: str, fn: Callable[[], T], *, what: str = "netns call") -> T:
    """``fn()`` in a thread that joined the network namespace at ``path``; its result or error.

    NotFound if ``path`` does not exist, InvalidArgument if it is not a network namespace.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFound("network namespace not found", netns=path) from None
            try:
                _setns(fd)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise InvalidArgument("not a network namespace", netns=path) from None
                raise NetworkError(f"setns: {exc.strerror}", netns=path) from exc
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread, re-raised there
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"netns {what}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


#: The namespace this process started in, kept open once :func:`unshare_netns` left it.
_host_fd: list[int] = []


def host_netns_path() -> str:
    """A path to the host's network namespace: the one this process started in."""
    return f"/proc/self/fd/{_host_fd[0]}" if _host_fd else "/proc/self/ns/net"


def unshare_netns() -> str:
    """Move this process into a new, empty network namespace and return its path.

    What runc does for a spec asking for a new network namespace: hooks given the state's PID
    find it at ``/proc/<pid>/ns/net`` and may fill it (docker's libnetwork moves the container's
    veth there). Call it from the main thread (``/proc/<pid>/ns/net`` is the main thread's)
    before threads that should follow are started. The host's namespace stays reachable through
    :func:`host_netns_path` (run hooks there, as runc does).
    """
    if _host_fd:
        raise NetworkError("this process left the host's network namespace already")
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    if _libc().unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise NetworkError(f"unshare(CLONE_NEWNET): {os.strerror(err)}", errno=err)
    _host_fd.append(fd)
    return f"/proc/{os.getpid()}/ns/net"


def is_host_netns(path: str) -> bool:
    """True if ``path`` is the host's network namespace (the one this process started in);
    NotFound if missing."""
    try:
        target, own = os.stat(path), os.stat(host_netns_path())
    except FileNotFoundError:
        raise NotFound("network namespace not found", netns=path) from None
    return (target.st_dev, target.st_ino) == (own.st_dev, own.st_ino)


def refuse_host_netns(path: str) -> None:
    """InvalidArgument if ``path`` is this process's own network namespace: wiring it would hand
    the host's interfaces to a VM."""
    if is_host_netns(path):
        raise InvalidArgument("the pod's network namespace is the host's own: refusing to wire it", netns=path)


def netlink_socket(path: str) -> socket.socket:
    """A NETLINK_ROUTE socket of the namespace at ``path`` (for pyroute2's ``IPRoute(fileno=...)``)."""
    return run_in_netns(path, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE),
                        what="netlink")  # fmt: skip


def _ifreq(name: str, flags: int) -> bytes:
    return struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), flags)


def open_tap(path: str, name: str, *, vnet_hdr: bool = True) -> int:
    """Create tap ``name`` in the namespace at ``path``; its queue fd (close-on-exec).

    The tap is not persistent: it disappears when the last fd on it closes (ours and the VMM's
    copy), so an owner that dies cannot leak it. NetworkError (with ``errno``) if the kernel
    refuses, e.g. the name is taken by another device.
    """
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise InvalidArgument("bad tap name", interface=name)

    def create() -> int:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NetworkError(f"open /dev/net/tun: {exc.strerror}", netns=path, interface=name,
                               errno=errno.errorcode.get(exc.errno or 0)) from exc  # fmt: skip
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)))
        except OSError as exc:
            os.close(fd)
            hint = "the name is taken by another device" if exc.errno in (errno.EBUSY, errno.EINVAL,
                                                                          errno.EEXIST) else None  # fmt: skip
            raise NetworkError(f"create tap: {exc.strerror}", netns=path, interface=name,
                               errno=errno.errorcode.get(exc.errno or 0), hint=hint) from exc  # fmt: skip
        return fd

    return run_in_netns(path, create, what="tap")


def tap_name(fd: int) -> str:
    """The interface a tap or macvtap queue fd belongs to (TUNGETIFF)."""
    raw = fcntl.ioctl(fd, TUNGETIFF, b"\0" * 40)
    return raw[:IFNAMSIZ].split(b"\0", 1)[0].decode()


def open_macvtap(path: str, name: str, index: int) -> int:
    """The queue fd of macvtap ``name`` (ifindex ``index``) in the namespace at ``path``.

    Its character device is ``/dev/tap<ifindex>``, made by devtmpfs (no udev needed). ifindexes
    are per namespace, so the node is checked with TUNGETIFF to be the one we created.
    """
    node = f"/dev/tap{index}"
    try:
        fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"open macvtap device: {exc.strerror}", netns=path, interface=name, path=node,
                           hint="/dev must be devtmpfs (or udev must create /dev/tapN)") from exc  # fmt: skip
    try:
        found = tap_name(fd)
    except OSError as exc:
        os.close(fd)
        raise NetworkError(f"macvtap device: {exc.strerror}", netns=path, interface=name, path=node) from exc
    if found != name:
        os.close(fd)
        raise NetworkError("macvtap device node belongs to another interface (same ifindex in another netns)",
                           netns=path, interface=name, path=node, found=found)  # fmt: skip
    return fd

