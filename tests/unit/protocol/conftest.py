"""Fixtures for the protocol tests: servers on unix sockets in short temp dirs, and a leak check
(asyncio tasks and fds)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from ttrpc_helpers import ECHO, EchoImpl, fd_count

from cocoon.protocol import ttrpc


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short temp dir (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def no_leaks() -> AsyncIterator[None]:
    """Fails the test if it leaves asyncio tasks or file descriptors behind."""
    tasks = asyncio.all_tasks()
    fds = fd_count()
    yield
    for _ in range(20):
        await asyncio.sleep(0)
    left = asyncio.all_tasks() - tasks - {asyncio.current_task()}
    assert not left, f"leaked tasks: {left}"
    assert fd_count() == fds, f"leaked fds: {fd_count() - fds}"


@pytest.fixture
async def echo(sock_dir: Path, no_leaks: None) -> AsyncIterator[tuple[ttrpc.Server, EchoImpl, Path]]:
    """A server with the Echo service on a unix socket; closed (and leak-checked) after the test."""
    impl = EchoImpl()
    server = ttrpc.Server()
    server.register_service(ECHO, impl)
    path = sock_dir / "echo.sock"
    await server.serve_unix(path)
    yield server, impl, path
    await server.close()


@pytest.fixture
async def client(echo: tuple[ttrpc.Server, EchoImpl, Path]) -> AsyncIterator[ttrpc.Client]:
    c = await ttrpc.connect_unix(echo[2])
    yield c
    await c.close()
