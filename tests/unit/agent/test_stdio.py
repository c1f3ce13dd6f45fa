"""Process stdio in the agent, with real pipes, a real pty and real child processes."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from cocoon.agent.reaper import Reaper
from cocoon.agent.stdio import (
    HIGH_WATER,
    OutputBuffer,
    ProcessIO,
    console_socket,
    receive_pty_master,
    winsize,
)
from cocoon.errors import StateError


@pytest.fixture
async def reaper():
    r = Reaper()
    r.install()
    yield r
    r.close()


async def read_all(buf: OutputBuffer, size: int = 65536) -> bytes:
    out = bytearray()
    while chunk := await asyncio.wait_for(buf.read(size), 10):
        out += chunk
    return bytes(out)


def spawn_with(reaper: Reaper, argv: list[str], io: ProcessIO, child) -> int:
    pid = reaper.spawn(argv, stdin=child.stdin, stdout=child.stdout, stderr=child.stderr)
    child.close()  # like the agent after crun: only the process holds its ends
    io.start()
    return pid


async def test_pipes_stdout_stderr_and_eof(reaper: Reaper) -> None:
    io, child = ProcessIO.pipes()
    pid = spawn_with(reaper, ["sh", "-c", "echo hello; echo err >&2; exit 3"], io, child)
    assert await read_all(io.stdout) == b"hello\n"
    assert await read_all(io.stderr) == b"err\n"
    assert await io.stdout.read() == b""  # EOF stays EOF
    assert await reaper.wait(pid, timeout=10) == 3
    await asyncio.wait_for(io.wait_drained(), 5)
    io.close()


async def test_stdin_round_trip_and_close(reaper: Reaper) -> None:
    io, child = ProcessIO.pipes()
    pid = spawn_with(reaper, ["cat"], io, child)
    payload = os.urandom(1 << 20)  # larger than the pipes: writing and reading must interleave

    async def feed() -> int:
        n = await io.write(payload)
        io.close_stdin()
        return n

    written, echoed = await asyncio.gather(feed(), read_all(io.stdout))
    assert written == len(payload)
    assert echoed == payload
    assert await reaper.wait(pid, timeout=10) == 0
    with pytest.raises(StateError):
        await io.write(b"more")
    io.close_stdin()  # idempotent
    io.close()


async def test_write_to_a_process_that_closed_stdin(reaper: Reaper) -> None:
    io, child = ProcessIO.pipes()
    pid = spawn_with(reaper, ["true"], io, child)
    assert await reaper.wait(pid, timeout=10) == 0
    with pytest.raises(StateError, match="closed its stdin"):
        await io.write(b"x" * 100_000)
    io.close()


async def test_flow_control_blocks_the_writer_and_loses_nothing(reaper: Reaper) -> None:
    io, child = ProcessIO.pipes()
    total = 5 * HIGH_WATER
    pid = spawn_with(reaper, ["head", "-c", str(total), "/dev/zero"], io, child)
    exit_future = reaper.watch(pid)
    for _ in range(300):
        if io.stdout.paused:
            break
        await asyncio.sleep(0.01)
    assert io.stdout.paused
    await asyncio.sleep(0.2)
    # The agent holds at most about the limit; the rest waits in the writer, which is blocked.
    assert HIGH_WATER < io.stdout.buffered <= HIGH_WATER + 65536
    assert not exit_future.done()
    data = await read_all(io.stdout, 1 << 20)
    assert len(data) == total and data.count(0) == total
    assert await reaper.wait(pid, timeout=10) == 0
    io.close()


async def test_output_written_just_before_exit_is_all_read(reaper: Reaper) -> None:
    io, child = ProcessIO.pipes()
    pid = spawn_with(reaper, ["sh", "-c", "head -c 300000 /dev/zero; echo -n tail; exit 0"], io, child)
    assert await reaper.wait(pid, timeout=10) == 0  # exited before anything was read
    data = await read_all(io.stdout)
    assert len(data) == 300_004 and data.endswith(b"tail")


async def test_close_wakes_readers(reaper: Reaper) -> None:
    io, child = ProcessIO.pipes()
    pid = spawn_with(reaper, ["sleep", "30"], io, child)
    pending = asyncio.ensure_future(io.stdout.read())
    await asyncio.sleep(0.05)
    assert not pending.done()
    io.close()
    assert await asyncio.wait_for(pending, 5) == b""
    await asyncio.wait_for(io.wait_drained(), 5)
    os.kill(pid, 9)
    assert await reaper.wait(pid, timeout=10) == 137


async def test_resize_needs_a_terminal() -> None:
    io, child = ProcessIO.pipes()
    child.close()
    with pytest.raises(StateError):
        io.resize(24, 80)
    io.close()


# ---- terminal mode


async def test_terminal_output_resize_and_eof(reaper: Reaper) -> None:
    master, slave = os.openpty()
    io = ProcessIO.terminal(master)
    io.resize(40, 100)
    assert winsize(master) == (40, 100)
    pid = reaper.spawn(["sh", "-c", "echo hi; stty size; head -c 100000 /dev/zero | tr '\\0' a"],
                       stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    io.start()
    assert await reaper.wait(pid, timeout=10) == 0
    out = await read_all(io.stdout)  # EIO once the slave is gone: reads as EOF, after all data
    assert out.startswith(b"hi\r\n40 100\r\n")
    assert out.count(b"a") == 100_000
    assert await read_all(io.stderr) == b""  # merged into the terminal
    await asyncio.wait_for(io.wait_drained(), 5)
    io.close()


async def test_terminal_input_and_close_stdin_sends_eof(reaper: Reaper) -> None:
    master, slave = os.openpty()
    io = ProcessIO.terminal(master)
    pid = reaper.spawn(["cat"], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    io.start()
    await io.write(b"abc\n")
    io.close_stdin()  # ^D: cat sees end of input and exits
    assert await reaper.wait(pid, timeout=10) == 0
    out = await read_all(io.stdout)
    assert out.count(b"abc\r\n") == 2  # the terminal's echo, then cat's copy
    io.close()


async def test_console_socket_hands_over_a_pty_master(tmp_path) -> None:
    path = str(tmp_path / "console.sock")
    listener = console_socket(path)
    master, slave = os.openpty()
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        socket.send_fds(client, [b"pty"], [master])  # what crun does with --console-socket
        client.close()
        received = await receive_pty_master(listener, timeout=5)
        try:
            os.write(slave, b"ping\n")
            await asyncio.sleep(0.05)
            assert b"ping" in os.read(received, 100)
        finally:
            os.close(received)
    finally:
        listener.close()
        os.close(master)
        os.close(slave)
