"""Guest agent main: early init, then serve the agent API over the agent channel.

In the guest (PID 1): ``python3 -m cocoon.agent``: mounts and modules (init.setup),
then serves ttRPC on the virtio-serial port named ``cocoon.agent`` (or on vsock
when the kernel command line says ``cocoon.channel=vsock``), reaping orphans.

On a host, for tests and development: ``python3 -m cocoon.agent --listen unix:PATH``
serves the same API on a unix socket without touching the machine (no init, no poweroff).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from cocoon import log
from cocoon.agent import facts

logger = log.get_logger("agent")

AGENT_PORT_NAME = "cocoon.agent"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cocoon-agent")
    p.add_argument("--listen", default="", help="unix:PATH (host mode, for tests); default: the guest channel")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


async def serve(listen: str, in_guest: bool) -> None:
    from cocoon.agent.service import AgentServer

    server = AgentServer(in_guest=in_guest)
    loop = asyncio.get_running_loop()
    if in_guest:
        # Only the modules the agent channel needs were loaded before serving; the rest (virtio-fs,
        # net, blk, overlay, vsock) load on a thread while the host already talks to us.
        # (A plain thread: the executor's module is not in the guest's minimal stdlib.)
        import threading

        server.modules_ready.clear()

        def load() -> None:
            _load_late_modules()
            loop.call_soon_threadsafe(server.modules_ready.set)

        threading.Thread(target=load, name="modules", daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_shutdown)
    if listen.startswith("unix:"):
        await server.serve_unix(listen.removeprefix("unix:"))
        return
    params = facts.cmdline_params(Path("/proc/cmdline").read_text())
    if params.get("cocoon.channel") == "vsock":
        await server.serve_vsock(int(params.get("cocoon.vsock_port", "1024")))
        return
    port = None
    for _ in range(500):  # the port appears once virtio_console is loaded
        port = facts.find_virtio_port(AGENT_PORT_NAME)
        if port is not None and port.exists():
            break
        await asyncio.sleep(0.01)
    if port is None:
        raise RuntimeError(f"virtio-serial port {AGENT_PORT_NAME} not found")
    await server.serve_chardev(str(port))


def _load_late_modules() -> None:
    from cocoon.agent import init

    try:
        init.load_modules(early=False)
    except Exception as exc:  # a module that fails is reported; what needs it fails clearly later
        logger.error("loading modules failed", error=f"{type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    in_guest = os.getpid() == 1 and not args.listen
    log.setup(level="debug" if args.debug else "info", fmt="json", stream=sys.stderr)
    if in_guest:
        from cocoon.agent import init

        init.setup(defer_modules=True)  # mounts /proc first: the command line is readable only after it
        params = facts.cmdline_params(Path("/proc/cmdline").read_text())
        if params.get("cocoon.debug") == "1":  # [agent] debug on the host
            logging.getLogger("cocoon").setLevel(logging.DEBUG)
        with log.bind(sandbox=params.get("cocoon.sandbox")):
            try:
                asyncio.run(serve(args.listen, in_guest=True))
            except BaseException as exc:  # PID 1 must never just exit: say why, then power off
                logger.error("agent stopped", error=f"{type(exc).__name__}: {exc}")
            init.poweroff()
        return 0
    asyncio.run(serve(args.listen, in_guest=False))
    return 0
