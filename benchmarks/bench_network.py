"""Pod network throughput and latency: cocoon (tcfilter, macvtap) vs runc, same CNI-like set-up.

For each runtime a fresh pair of namespaces is made: a "pod" namespace with a veth (10.66.0.2/24,
default route), as a CNI plugin leaves it, and a "peer" namespace with the veth's other end (the
host/bridge side). The container runs ``iperf3 -s`` in the pod's network; from the peer namespace
we measure TCP throughput peer->container and container->peer (``iperf3 -R``) and the ping round
trip. One run, ratios to runc. No traffic leaves the two namespaces.

Container to container: two pod namespaces whose veths are ports of one bridge in a third
namespace (what the CNI bridge plugin builds); container A runs ``iperf3 -s``, the client runs in
container B (runc: in B's namespace; cocoon: exec'd in B's VM), each direction, plus ping B->A.
Two VMs for cocoon, each with its own tap.

    .venv/bin/python benchmarks/bench_network.py [--seconds 5] [--pings 20] [--no-c2c | --no-peer]
        [--models tcfilter,macvtap]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import table

from cocoon import config
from cocoon.api.bundle import make_bundle

POD_IP, PEER_IP = "10.66.0.2", "10.66.0.1"
A_IP, B_IP = "10.66.1.2", "10.66.1.3"  # container to container, on one bridge


def sh(argv: list[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if check and out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: {out.stderr.strip()[-400:]}")
    return out


class Namespaces:
    """pod + peer namespaces joined by a veth (the test topology, made with iproute2 here)."""

    def __init__(self, tag: str) -> None:
        self.pod, self.peer = f"bnpod-{tag}-{os.getpid()}", f"bnpeer-{tag}-{os.getpid()}"

    def __enter__(self) -> Namespaces:
        sh(["ip", "netns", "add", self.pod])
        sh(["ip", "netns", "add", self.peer])
        sh(["ip", "-n", self.peer, "link", "add", "veth-peer", "type", "veth", "peer", "name", "eth0", "netns",
            self.pod])  # fmt: skip
        for ns, dev, ip in ((self.peer, "veth-peer", PEER_IP), (self.pod, "eth0", POD_IP)):
            sh(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
            sh(["ip", "-n", ns, "link", "set", dev, "up"])
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        sh(["ip", "-n", self.pod, "route", "add", "default", "via", PEER_IP])
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.peer, self.pod):
            sh(["ip", "netns", "del", ns], check=False)

    @property
    def pod_path(self) -> str:
        return f"/run/netns/{self.pod}"

    def peer_run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return sh(["nsenter", f"--net=/run/netns/{self.peer}", *argv], check=False, timeout=120)


class Bridged:
    """Two pod namespaces (a, b) with a veth each, the other ends on bridge ``br0`` in a third."""

    def __init__(self, tag: str) -> None:
        self.bridge = f"bnbr-{tag}-{os.getpid()}"
        self.pods = {"a": f"bna-{tag}-{os.getpid()}", "b": f"bnb-{tag}-{os.getpid()}"}

    def __enter__(self) -> Bridged:
        sh(["ip", "netns", "add", self.bridge])
        sh(["ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge"])
        sh(["ip", "-n", self.bridge, "link", "set", "br0", "up"])
        for (key, ns), ip in zip(self.pods.items(), (A_IP, B_IP), strict=True):
            sh(["ip", "netns", "add", ns])
            sh(["ip", "-n", self.bridge, "link", "add", f"veth-{key}", "type", "veth", "peer", "name", "eth0",
                "netns", ns])  # fmt: skip
            sh(["ip", "-n", self.bridge, "link", "set", f"veth-{key}", "master", "br0", "up"])
            sh(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
            sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (*self.pods.values(), self.bridge):
            sh(["ip", "netns", "del", ns], check=False)

    def path(self, key: str) -> str:
        return f"/run/netns/{self.pods[key]}"


def parse_c2c(run: Callable[[list[str]], str], seconds: int, pings: int) -> dict[str, float]:
    """iperf3 client (both directions) and ping from container B to A's server; ``run`` runs in B."""
    deadline = time.monotonic() + 60
    while '"sum_received"' not in (last := run(["iperf3", "-c", A_IP, "-t", "1", "-J"])):  # A's server is up
        if time.monotonic() > deadline:
            error = json.loads(last).get("error") if last.startswith("{") else last[-300:]
            raise SystemExit(f"iperf3 server in container A did not answer: {error}")
        time.sleep(0.5)
    out: dict[str, float] = {}
    for key, extra in (("B->A Mbit/s", []), ("A->B Mbit/s", ["-R"])):
        for _ in range(10):  # the server answers "busy" while it finishes the previous test
            time.sleep(1)
            data = json.loads(run(["iperf3", "-c", A_IP, "-t", str(seconds), "-J", *extra]) or "{}")
            if "sum_received" in data.get("end", {}):
                break
        else:
            raise SystemExit(f"iperf3 failed: {data.get('error')}")
        out[key] = data["end"]["sum_received"]["bits_per_second"] / 1e6
    m = re.search(r"= [\d.]+/([\d.]+)/", run(["ping", "-c", str(pings), "-W", "2", A_IP]))
    out["ping avg ms"] = float(m.group(1)) if m else float("nan")
    return out


def iperf_bundle(directory: Path, netns: str) -> Path:
    """busybox bundle plus iperf3 and its libraries; the container joins ``netns`` (runc) / uses the VM's."""
    bundle = make_bundle(directory, ["iperf3", "-s"])
    rootfs = bundle / "rootfs"
    binary = shutil.which("iperf3")
    if binary is None:
        raise SystemExit("iperf3 is not installed (apt-get install iperf3)")
    files = [binary, *re.findall(r"(/\S+) \(0x", sh(["ldd", binary]).stdout)]
    for f in files:
        dest = rootfs / Path(f).resolve().relative_to("/") if f != binary else rootfs / "bin" / "iperf3"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(f).resolve(), dest)
        if f != binary and Path(f).resolve() != Path(f):
            link = rootfs / Path(f).relative_to("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(Path(f).resolve())
    for name in ("lib", "lib64"):
        if (rootfs / "usr" / name).exists() and not (rootfs / name).exists():
            (rootfs / name).symlink_to(f"usr/{name}")
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    spec["linux"]["namespaces"].append({"type": "network", "path": netns})
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def measure(ns: Namespaces, seconds: int, pings: int) -> dict[str, float]:
    deadline = time.monotonic() + 60
    while ns.peer_run(["iperf3", "-c", POD_IP, "-t", "1", "-J"]).returncode != 0:  # server up and reachable
        if time.monotonic() > deadline:
            raise SystemExit("iperf3 server in the container did not answer")
        time.sleep(0.5)
    out: dict[str, float] = {}
    for key, extra in (("peer->ctr Mbit/s", []), ("ctr->peer Mbit/s", ["-R"])):
        for _ in range(10):  # the server answers "busy" while it finishes the previous test
            time.sleep(1)
            data = json.loads(ns.peer_run(["iperf3", "-c", POD_IP, "-t", str(seconds), "-J", *extra]).stdout)
            if "sum_received" in data.get("end", {}):
                break
        else:
            raise SystemExit(f"iperf3 failed: {data.get('error')}")
        out[key] = data["end"]["sum_received"]["bits_per_second"] / 1e6
    ping = ns.peer_run(["busybox", "ping", "-c", str(pings), "-W", "2", POD_IP]).stdout
    m = re.search(r"= [\d.]+/([\d.]+)/", ping)
    out["ping avg ms"] = float(m.group(1)) if m else float("nan")
    return out


def run_runc(tmp: Path, seconds: int, pings: int) -> dict[str, float]:
    with Namespaces("runc") as ns:
        bundle = iperf_bundle(tmp / "runc-bundle", ns.pod_path)
        cid, root = f"bn-runc-{os.getpid()}", tmp / "runc-root"
        # Detached: the container keeps its stdio, so none of it may be a pipe we wait on.
        subprocess.run(["runc", "--root", str(root), "run", "-d", "--bundle", str(bundle), cid], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        try:
            return measure(ns, seconds, pings)
        finally:
            sh(["runc", "--root", str(root), "delete", "--force", cid], check=False)


async def run_cocoon(tmp: Path, model: str, seconds: int, pings: int) -> dict[str, float]:
    from cocoon.api.sandbox import Sandbox
    from cocoon.oci.spec import load

    cfg = config.load(None)
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, internetworking_model=cast(Any, model)))
    with Namespaces(model[:3]) as ns:
        bundle = iperf_bundle(tmp / f"{model}-bundle", ns.pod_path)
        async with Sandbox(cfg, f"bn-{model}-{os.getpid()}", tmp / f"sb-{model[:3]}", netns=ns.pod_path) as sb:
            c = await sb.create_container("iperf", load(bundle))
            await c.start()
            return await asyncio.to_thread(measure, ns, seconds, pings)


def c2c_runc(tmp: Path, seconds: int, pings: int) -> dict[str, float]:
    with Bridged("runc") as net:
        root = tmp / "runc-root"
        ids = []
        try:
            for key in ("a", "b"):
                cid = f"bn-runc-{key}-{os.getpid()}"
                bundle = iperf_bundle(tmp / f"runc-c2c-{key}", net.path(key))
                subprocess.run(["runc", "--root", str(root), "run", "-d", "--bundle", str(bundle), cid], check=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=60)  # fmt: skip
                ids.append(cid)
            busybox = shutil.which("busybox") or "busybox"

            def in_b(argv: list[str]) -> str:
                argv = [busybox, *argv] if argv[0] == "ping" else argv
                return sh(["nsenter", f"--net={net.path('b')}", *argv], check=False, timeout=120).stdout

            return parse_c2c(in_b, seconds, pings)
        finally:
            for cid in ids:
                sh(["runc", "--root", str(root), "delete", "--force", cid], check=False)


async def c2c_cocoon(tmp: Path, model: str, seconds: int, pings: int) -> dict[str, float]:
    from contextlib import AsyncExitStack

    from cocoon.api.sandbox import Sandbox
    from cocoon.oci.spec import load

    cfg = config.load(None)
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, internetworking_model=cast(Any, model)))
    caps = ["CAP_NET_RAW"]
    with Bridged(model[:3]) as net:
        async with AsyncExitStack() as stack:
            containers = {}
            for key in ("a", "b"):  # one after the other: two TCG boots at once only slow each other down
                sb = await stack.enter_async_context(
                    Sandbox(cfg, f"bn-{model}-{key}-{os.getpid()}", tmp / f"c2c-{model[:3]}-{key}",
                            netns=net.path(key)))  # fmt: skip
                c = await sb.create_container("iperf", load(iperf_bundle(tmp / f"c2c-{model}-{key}", net.path(key))))
                await c.start()
                containers[key] = c
            loop = asyncio.get_running_loop()
            counter = iter(range(1000))

            async def exec_in_b(argv: list[str]) -> str:
                proc = await containers["b"].exec(f"x{next(counter)}", {
                    "args": argv, "cwd": "/", "env": ["PATH=/bin"],
                    "capabilities": {"bounding": caps, "effective": caps, "permitted": caps}})  # fmt: skip
                out, _, _ = await proc.output()
                return out.decode(errors="replace")

            def in_b(argv: list[str]) -> str:
                return asyncio.run_coroutine_threadsafe(exec_in_b(argv), loop).result(300)

            return await asyncio.to_thread(parse_c2c, in_b, seconds, pings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--pings", type=int, default=20)
    ap.add_argument("--no-c2c", action="store_true", help="skip the container-to-container table")
    ap.add_argument("--no-peer", action="store_true", help="skip the peer-to-container table")
    ap.add_argument("--models", default="tcfilter,macvtap", help="cocoon models to run (comma-separated)")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bn-", dir="/run") as d:
        tmp = Path(d)
        if not args.no_peer:
            if shutil.which("runc"):
                results["runc"] = run_runc(tmp, args.seconds, args.pings)
            for model in models:
                results[f"cocoon {model}"] = asyncio.run(run_cocoon(tmp, model, args.seconds, args.pings))
            print(_table("pod network, one run (ratio to runc)", results), flush=True)
        if args.no_c2c:
            return
        c2c: dict[str, dict[str, float]] = {}
        if shutil.which("runc"):
            c2c["runc"] = c2c_runc(tmp, args.seconds, args.pings)
        for model in models:
            try:
                c2c[f"cocoon {model}"] = asyncio.run(c2c_cocoon(tmp, model, args.seconds, args.pings))
            except SystemExit as exc:  # one model failing must not lose the others' numbers
                print(f"cocoon {model}, container to container: {exc}", file=sys.stderr, flush=True)
        print(_table("container to container over a bridge, one run (ratio to runc)", c2c))


def _table(title: str, results: dict[str, dict[str, float]]) -> str:
    base = results.get("runc")
    keys = list(next(iter(results.values()))) if results else []
    rows = []
    for name, r in results.items():
        cells: list[object] = [name]
        for k in keys:
            ratio = f" ({r[k] / base[k]:.3f}x)" if base and base[k] else ""
            cells.append(f"{r[k]:.2f}{ratio}")
        rows.append(cells)
    return table(title, ["runtime", *keys], rows)


if __name__ == "__main__":
    main()
