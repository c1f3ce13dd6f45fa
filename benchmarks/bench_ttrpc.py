"""ttrpc round trips over a unix socket: cocoon's ttrpc vs a plain asyncio length-prefixed echo.

The peer is the Python ceiling for this workload: the same event loop, StreamReader.readexactly and
a 4-byte length prefix, no envelope, no protobuf, no dispatch. Both servers run in their own process
(as the agent would, in the guest); the client measures every call.

Workloads: one client calling sequentially, and 32 calls kept in flight on one connection.
The call is Health.Check (CheckRequest -> HealthCheckResponse), the agent's liveness probe.

    .venv/bin/python benchmarks/bench_ttrpc.py [--calls 20000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import p, table

from cocoon.protocol import ttrpc
from cocoon.protocol.gen.agent.v1 import agent_pb2
from cocoon.util import proc

HEALTH = agent_pb2.DESCRIPTOR.services_by_name["Health"]
REQUEST = agent_pb2.CheckRequest(service="bench")
REPLY = agent_pb2.HealthCheckResponse(status=agent_pb2.HealthCheckResponse.SERVING)


# ---- servers (run in a child process)


class Health:
    async def Check(self, request: agent_pb2.CheckRequest, ctx: ttrpc.ServerContext) -> agent_pb2.HealthCheckResponse:
        return REPLY


async def _until_terminated() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


async def serve_ttrpc(path: str) -> None:
    server = ttrpc.Server()
    server.register_service(HEALTH, Health())
    await server.serve_unix(path)
    await _until_terminated()
    await server.close()


async def serve_echo(path: str) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(4)
                body = await reader.readexactly(int.from_bytes(header, "big"))
                writer.write(header + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_unix_server(echo, path)
    await _until_terminated()
    server.close()


# ---- clients


class EchoClient:
    """Length-prefixed echo with many requests in flight: the server answers in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.waiting: deque[asyncio.Future[bytes]] = deque()
        self.task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        while True:
            header = await self.reader.readexactly(4)
            body = await self.reader.readexactly(int.from_bytes(header, "big"))
            self.waiting.popleft().set_result(body)

    async def call(self, payload: bytes) -> bytes:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.writer.write(len(payload).to_bytes(4, "big") + payload)
        return await future

    async def close(self) -> None:
        self.task.cancel()
        self.writer.close()


async def measure(call: Callable[[], Awaitable[object]], calls: int, concurrency: int) -> tuple[float, list[float]]:
    """(round trips per second, latencies in microseconds) of ``calls`` calls, ``concurrency`` in flight."""
    latencies: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            started = time.perf_counter_ns()
            await call()
            latencies.append((time.perf_counter_ns() - started) / 1000)

    for _ in range(min(1000, calls // 10)):  # warm up
        await call()
    per_worker = calls // concurrency
    started = time.perf_counter()
    await asyncio.gather(*(worker(per_worker) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return per_worker * concurrency / elapsed, latencies


async def bench(ttrpc_path: Path, echo_path: Path, calls: int, concurrency: int) -> list[list[object]]:
    client = await ttrpc.connect_unix(ttrpc_path)
    stub = ttrpc.Stub(client, HEALTH)
    check = stub.Check
    reader, writer = await asyncio.open_unix_connection(echo_path)
    echo = EchoClient(reader, writer)
    payload = REQUEST.SerializeToString()

    async def ttrpc_call() -> object:
        return await check(REQUEST)

    async def echo_call() -> object:
        return agent_pb2.HealthCheckResponse.FromString(await echo.call(payload))

    rows: list[list[object]] = []
    for label, n in (("sequential, 1 in flight", 1), (f"{concurrency} in flight, 1 connection", concurrency)):
        ours, our_lat = await measure(ttrpc_call, calls, n)
        peer, peer_lat = await measure(echo_call, calls, n)
        rows.append(
            [
                label,
                f"{ours:,.0f}",
                f"{peer:,.0f}",
                f"{ours / peer:.2f}",
                f"{p(our_lat, 0.5):.0f} / {p(our_lat, 0.99):.0f}",
                f"{p(peer_lat, 0.5):.0f} / {p(peer_lat, 0.99):.0f}",
            ]
        )
    await client.close()
    await echo.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--serve", choices=["ttrpc", "echo"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve_ttrpc(args.path) if args.serve == "ttrpc" else serve_echo(args.path))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-ttrpc-") as tmp:
        ttrpc_path, echo_path = Path(tmp) / "ttrpc.sock", Path(tmp) / "echo.sock"
        with (
            proc.spawn([sys.executable, __file__, "--serve", "ttrpc", "--path", ttrpc_path], stderr=None),
            proc.spawn([sys.executable, __file__, "--serve", "echo", "--path", echo_path], stderr=None),
        ):
            proc.wait_for(lambda: ttrpc_path.exists() and echo_path.exists(), timeout=20, what="servers")
            rows = asyncio.run(bench(ttrpc_path, echo_path, args.calls, args.concurrency))
    print(
        table(
            f"ttrpc Health.Check over a unix socket, {args.calls} calls per row (latency in microseconds)",
            ["workload", "ttrpc rt/s", "echo rt/s", "ratio", "ttrpc p50 / p99", "echo p50 / p99"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
