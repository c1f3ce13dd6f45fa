"""Transports: the character-device session loop (ptys stand in for a virtio-serial port), vsock."""

from __future__ import annotations

import asyncio
import errno
import os
import pty
import socket
import time
import tty

import pytest
from ttrpc_helpers import ECHO, SERVICE, EchoImpl, EchoReply, EchoRequest

from cocoon import errors
from cocoon.protocol import ttrpc
from cocoon.protocol.ttrpc.chardev import CharDevTransport, poll_peer_present
from cocoon.protocol.ttrpc.framing import encode_frame
from cocoon.protocol.ttrpc.wire import encode_request


class PtyDevice:
    """Stands in for a virtio-serial port: every open() is a new session whose host end is a pty master.

    Closing the master is the host going away: the guest end reads EIO and polls POLLHUP,
    like a port whose host chardev disconnected.
    """

    def __init__(self) -> None:
        self.masters: asyncio.Queue[int] = asyncio.Queue()
        self.opened = 0

    def open(self) -> int:
        master, slave = pty.openpty()
        tty.setraw(slave)  # no echo, no line discipline: a byte pipe
        self.opened += 1
        self.masters.put_nowait(master)
        return slave


async def host_client(master: int) -> ttrpc.Client:
    """A ttrpc client on the host end of a pty session."""
    reader, writer = await CharDevTransport("host-end").open_session(master)
    return ttrpc.Client(reader, writer, name="host")


async def test_chardev_serves_session_after_session_from_a_clean_frame_boundary(no_leaks):
    device = PtyDevice()
    server = ttrpc.Server()
    server.register_service(ECHO, EchoImpl())
    await server.serve(CharDevTransport("/dev/vport-test", opener=device.open, poll_interval=0.005))

    # Session 1: a normal call, then the host goes away in the middle of a frame.
    master = await asyncio.wait_for(device.masters.get(), 2)
    client = await host_client(master)
    assert (await client.call(SERVICE, "Unary", EchoRequest(text="one"), EchoReply, timeout=2)).text == "one"
    frame = encode_frame(3, 1, 0, encode_request(SERVICE, "Unary", EchoRequest(text="lost").SerializeToString()))
    os.write(master, frame[:15])
    await asyncio.sleep(0.01)
    await client.close()

    # Session 2: the server reopened the device and reads from a clean frame boundary.
    client = await host_client(await asyncio.wait_for(device.masters.get(), 2))
    replies = await asyncio.gather(
        *(client.call(SERVICE, "Unary", EchoRequest(text=f"two-{i}"), EchoReply, timeout=2) for i in range(8))
    )
    assert [r.text for r in replies] == [f"two-{i}" for i in range(8)]
    await client.close()

    third = await asyncio.wait_for(device.masters.get(), 2)  # session 3 is waiting for its host
    await server.close()
    os.close(third)
    assert device.opened == 3


async def test_wait_for_peer_polls_without_spinning():
    probes: list[float] = []

    def absent_for_a_while(fd: int) -> bool:
        probes.append(time.monotonic())
        return len(probes) > 5

    read_end, write_end = os.pipe()
    transport = CharDevTransport("/dev/fake", opener=lambda: os.dup(read_end), peer_present=absent_for_a_while,
                                 poll_interval=0.01)
    started = time.monotonic()
    fd = await transport.wait_for_peer()
    elapsed = time.monotonic() - started
    os.close(fd)
    os.close(read_end)
    os.close(write_end)
    assert len(probes) == 6
    assert elapsed >= 0.045  # five sleeps of 10 ms, not a busy loop


async def test_wait_for_peer_retries_a_device_that_cannot_be_opened_yet():
    attempts = []
    read_end, write_end = os.pipe()

    def opener() -> int:
        attempts.append(1)
        if len(attempts) < 3:
            raise FileNotFoundError(errno.ENOENT, "no such device")
        return os.dup(read_end)

    fd = await CharDevTransport("/dev/late", opener=opener, peer_present=lambda fd: True,
                                poll_interval=0.005).wait_for_peer()
    assert len(attempts) == 3
    for f in (fd, read_end, write_end):
        os.close(f)


def test_poll_sees_the_host_side_hang_up():
    master, slave = pty.openpty()
    try:
        assert poll_peer_present(slave)
        os.close(master)
        assert not poll_peer_present(slave)
    finally:
        os.close(slave)


async def test_chardev_connect_without_device_or_peer_is_unavailable():
    def missing() -> int:
        raise FileNotFoundError(errno.ENOENT, "gone")

    with pytest.raises(ttrpc.Unavailable, match="cannot open device"):
        await CharDevTransport("/dev/none", opener=missing).connect()
    read_end, write_end = os.pipe()
    with pytest.raises(ttrpc.Unavailable, match="no peer"):
        await CharDevTransport("/dev/x", opener=lambda: os.dup(read_end), peer_present=lambda fd: False).connect()
    os.close(read_end)
    os.close(write_end)


async def test_chardev_client_side_connect_over_a_pty(no_leaks):
    master, slave = pty.openpty()
    tty.setraw(slave)
    server = ttrpc.Server()
    server.register_service(ECHO, EchoImpl())
    served = asyncio.create_task(server.serve_connection(*await CharDevTransport("h").open_session(master)))
    client = await ttrpc.Client.connect(CharDevTransport("/dev/pts/x", opener=lambda: slave))
    assert (await client.call(SERVICE, "Unary", EchoRequest(text="guest"), EchoReply, timeout=2)).text == "guest"
    await client.close()
    await asyncio.wait_for(served, 2)
    await server.close()


def test_vsock_address_validation():
    with pytest.raises(errors.InvalidArgument):
        ttrpc.VsockTransport(-1, 1024)
    with pytest.raises(errors.InvalidArgument):
        ttrpc.VsockTransport(3, 2**32)
    assert repr(ttrpc.VsockTransport(3, 1024)) == "vsock:3:1024"


async def test_vsock_without_kernel_support_is_unavailable(monkeypatch):
    def no_vsock() -> socket.socket:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(ttrpc.VsockTransport, "_new_socket", staticmethod(no_vsock))
    with pytest.raises(ttrpc.Unavailable, match="vsock is not available"):
        await ttrpc.VsockTransport(3, 1024).connect()
    with pytest.raises(ttrpc.Unavailable):
        await ttrpc.Server().serve_vsock(1024)


async def test_vsock_round_trip_over_loopback(no_leaks):
    if os.environ.get("COCOON_TEST_VSOCK") != "1":
        pytest.skip("needs AF_VSOCK loopback (vsock_loopback module); set COCOON_TEST_VSOCK=1 to run")
    server = ttrpc.Server()
    server.register_service(ECHO, EchoImpl())
    port = 20000 + os.getpid() % 10000
    await server.serve_vsock(port)
    try:
        client = await asyncio.wait_for(ttrpc.connect_vsock(ttrpc.VMADDR_CID_LOCAL, port), 2)
        assert (await client.call(SERVICE, "Unary", EchoRequest(text="v"), EchoReply, timeout=2)).text == "v"
        await client.close()
    finally:
        await server.close()
