"""Two containers in one VM through the library API (``cocoon.api.sandbox``), as a pod runs.

    sudo .venv/bin/python examples/two_containers.py

Builds two busybox bundles in a temporary directory, starts one sandbox (one QEMU process),
runs a short-lived container and a long-running one in it, execs a process in the second,
prints what they wrote and their exit statuses, and stops everything. Needs root (bind mounts,
virtiofsd), QEMU and the guest image (``cocoon image build``); honours ``COCOON_CONFIG``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from cocoon import config
from cocoon.api.bundle import make_bundle
from cocoon.api.sandbox import Sandbox
from cocoon.oci.spec import Spec, load

SHOW = 'echo "$(hostname) $(uname -r)"'


def pod_bundle(directory: Path, args: list[str]) -> Spec:
    """A busybox bundle whose container shares the pod's hostname (no UTS namespace of its own)."""
    bundle = make_bundle(directory, args)
    raw = json.loads((bundle / "config.json").read_text())
    raw.pop("hostname", None)
    raw["linux"]["namespaces"] = [ns for ns in raw["linux"]["namespaces"] if ns["type"] != "uts"]
    (bundle / "config.json").write_text(json.dumps(raw, indent=2))
    return load(bundle)


def qemu_pids(sandbox_id: str) -> list[int]:
    """QEMU processes whose command line names the sandbox (``-name cocoon-<id>``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and f"cocoon-{sandbox_id},".encode() in b" ".join(argv):
            pids.append(int(entry.name))
    return pids


async def main() -> int:
    cfg = config.load(os.environ.get("COCOON_CONFIG") or None)
    with tempfile.TemporaryDirectory(prefix="cocoon-pod-") as tmp:
        work = Path(tmp)
        once = pod_bundle(work / "once", ["sh", "-c", f"{SHOW}; echo 'bye from once' >&2; exit 3"])
        server = pod_bundle(work / "server", ["sh", "-c", f"{SHOW}; exec sleep 600"])
        sandbox_id = f"example-{os.getpid()}"

        started = time.monotonic()
        async with Sandbox(cfg, sandbox_id, work / "sandbox", hostname="example-pod") as sandbox:
            print(f"sandbox {sandbox_id} running after {time.monotonic() - started:.2f} s ({sandbox.accel})")
            c1 = await sandbox.create_container("once", once)
            c2 = await sandbox.create_container("server", server)
            await c1.start()
            await c2.start()

            out, err, status = await c1.init.output()
            print(f"[once]   stdout {out.decode().strip()!r} stderr {err.decode().strip()!r} exit status {status}")

            first = await c2.init.read_stdout()
            print(f"[server] stdout {first.decode().strip()!r} (still running: {c2.state})")
            probe = await c2.exec("probe-1", {"args": ["sh", "-c", "echo exec in $(hostname); ls /"], "cwd": "/"})
            out, err, status = await probe.output()
            print(f"[server] exec probe-1: {out.decode().split()} exit status {status}")
            stats = await c2.stats()
            print(f"[server] memory {stats.memory.usage // 1024} KiB, pids {stats.pids.current}")

            pids = qemu_pids(sandbox_id)
            print(f"QEMU processes for the sandbox: {len(pids)} (pid {', '.join(map(str, pids))})")

            await c2.signal(signal.SIGKILL)
            _, _, status = await c2.init.output()
            print(f"[server] killed: exit status {status}")
        print(f"stopped; QEMU processes left for the sandbox: {len(qemu_pids(sandbox_id))}")
    return 0 if len(pids) == 1 and status == 137 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
