"""Pod network throughput and latency: cocoon (tcfilter, macvtap) vs runc, same CNI-like set-up.

For each runtime a fresh pair of namespaces is made: a "pod" namespace with a veth (10.66.0.2/24,
default route), as a CNI plugin leaves it, and a "peer" namespace with the veth's other end (the
host/bridge side). The container runs ``iperf3 -s`` in the pod's network; from the peer namespace
we measure TCP throughput peer->container and container->peer (``iperf3 -R``) and the ping round
trip. One run, ratios to runc. No traffic leaves the two namespaces.

    .venv/bin/python benchmarks/bench_network.py [--seconds 5] [--pings 20]
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import table

from cocoon import config
from cocoon.api.bundle import make_bundle

POD_IP, PEER_IP = "10.66.0.2", "10.66.0.1"


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
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, internetworking_model=model))
    with Namespaces(model[:3]) as ns:
        bundle = iperf_bundle(tmp / f"{model}-bundle", ns.pod_path)
        async with Sandbox(cfg, f"bn-{model}-{os.getpid()}", tmp / f"sb-{model[:3]}", netns=ns.pod_path) as sb:
            c = await sb.create_container("iperf", load(bundle))
            await c.start()
            return await asyncio.to_thread(measure, ns, seconds, pings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--pings", type=int, default=20)
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bn-", dir="/run") as d:
        tmp = Path(d)
        if shutil.which("runc"):
            results["runc"] = run_runc(tmp, args.seconds, args.pings)
        for model in ("tcfilter", "macvtap"):
            results[f"cocoon {model}"] = asyncio.run(run_cocoon(tmp, model, args.seconds, args.pings))
    base = results.get("runc")
    keys = ["peer->ctr Mbit/s", "ctr->peer Mbit/s", "ping avg ms"]
    rows = []
    for name, r in results.items():
        cells: list[object] = [name]
        for k in keys:
            ratio = f" ({r[k] / base[k]:.3f}x)" if base and base[k] else ""
            cells.append(f"{r[k]:.2f}{ratio}")
        rows.append(cells)
    print(table("pod network, one run (ratio to runc)", ["runtime", *keys], rows))


if __name__ == "__main__":
    main()
