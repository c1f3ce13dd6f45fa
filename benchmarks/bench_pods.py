"""Pods through CRI: RunPodSandbox + CreateContainer + StartContainer to the container's first output,
and host memory per pod — containerd-shim-cocoon-v2 next to containerd's runc shim, same pods.

A private containerd (CRI on, node network, local images) gets two runtime handlers, ``cocoon``
(io.containerd.cocoon.v2) and ``runc`` (io.containerd.runc.v2). For 1 and for N pods started in
parallel, each pod runs one container that prints a line and sleeps; the time is until that line is
in the pod's CRI log. Memory: PSS of every host process of the pods (shims, QEMU, virtiofsd for
cocoon; shims and the containers' processes for runc), per pod, measured while they idle.

    .venv/bin/python benchmarks/bench_pods.py [--parallel 5] [--cold]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, pss_kib, table

from cocoon.api.demo_image import PAUSE_CMD, export, make_layout

IMAGE, PAUSE = "localhost/bench-busybox:latest", "localhost/bench-pause:latest"


def start_containerd(d: Path, template_dir: str = "") -> subprocess.Popen[bytes]:
    factory = (f'[factory]\ntemplate = true\ntemplate_dir = "{template_dir}"\n' if template_dir
               else "[factory]\ntemplate = false\n")  # fmt: skip
    (d / "cocoon.toml").write_text(f'[runtime]\nroot = "{d}/cocoon"\n{factory}')
    (d / "config.toml").write_text(f"""version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "{PAUSE}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.cocoon]
      runtime_type = "io.containerd.cocoon.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{d}/cni"
""")
    env = {**os.environ, "COCOON_CONFIG": str(d / "cocoon.toml")}
    log = (d / "containerd.log").open("ab")
    proc = subprocess.Popen(["containerd", "--config", str(d / "config.toml")], stdout=log, stderr=log, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    for _ in range(100):
        if subprocess.run(["ctr", "-a", f"{d}/c.sock", "version"], capture_output=True, check=False).returncode == 0:
            return proc
        time.sleep(0.2)
    raise SystemExit("containerd did not start")


class Pods:
    def __init__(self, d: Path) -> None:
        import grpc
        from cri_api.v1 import api_pb2, api_pb2_grpc

        self.cri, self.d = api_pb2, d
        self.rt = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(f"unix://{d}/c.sock"))

    def config(self, name: str) -> Any:
        c = self.cri
        logs = self.d / "logs" / name
        logs.mkdir(parents=True, exist_ok=True)
        return c.PodSandboxConfig(
            metadata=c.PodSandboxMetadata(name=name, uid=name, namespace="bench"),
            log_directory=str(logs), linux=c.LinuxPodSandboxConfig(security_context=c.LinuxSandboxSecurityContext(
                namespace_options=c.NamespaceOption(network=c.NODE))))  # fmt: skip

    def run(self, name: str, handler: str) -> tuple[str, float]:
        """One pod with one container; seconds until its first line is in the CRI log."""
        c = self.cri
        cfg = self.config(name)
        t0 = time.monotonic()
        sid = self.rt.RunPodSandbox(c.RunPodSandboxRequest(config=cfg, runtime_handler=handler), timeout=600)
        cc = c.ContainerConfig(metadata=c.ContainerMetadata(name="app"), image=c.ImageSpec(image=IMAGE),
                               command=["sh", "-c", "echo ready; sleep 600"], log_path="app.log")  # fmt: skip
        request = c.CreateContainerRequest(pod_sandbox_id=sid.pod_sandbox_id, config=cc, sandbox_config=cfg)
        cid = self.rt.CreateContainer(request, timeout=600).container_id
        self.rt.StartContainer(c.StartContainerRequest(container_id=cid), timeout=600)
        log = Path(cfg.log_directory) / "app.log"
        while not (log.exists() and "ready" in log.read_text()):
            time.sleep(0.01)
        return sid.pod_sandbox_id, time.monotonic() - t0

    def remove(self, sid: str) -> None:
        self.rt.StopPodSandbox(self.cri.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=600)
        self.rt.RemovePodSandbox(self.cri.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=600)


def pod_processes(d: Path, handler: str) -> list[int]:
    """Host processes of the running pods of ``handler``: its shims and everything below them."""
    marker = "cocoon.shim" if handler == "cocoon" else "containerd-shim-runc-v2"
    shims = []
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
        if marker in cmd and str(d) in cmd:
            shims.append(int(entry.name))
    out, todo = [], list(shims)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def measure(pods: Pods, d: Path, handler: str, n: int) -> tuple[float, float]:
    """(median seconds to first output, PSS MiB per pod) for ``n`` pods started at once."""
    names = [f"{handler}-{n}-{i}" for i in range(n)]
    with ThreadPoolExecutor(max_workers=n) as pool:
        done = list(pool.map(lambda name: pods.run(name, handler), names))
    try:
        time.sleep(3)
        pss = sum(pss_kib(p) for p in pod_processes(d, handler) if Path(f"/proc/{p}").exists()) / 1024 / n
    finally:
        with ThreadPoolExecutor(max_workers=n) as pool:
            list(pool.map(pods.remove, [sid for sid, _ in done]))
    return median([t for _, t in done]), pss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parallel", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="cocoon's pods boot their VMs (no template, docs/factory.md)")
    args = ap.parse_args()
    template_dir = "" if args.cold else f"/dev/shm/cocoon-bench-pods-{os.getpid()}"
    for binary in ("containerd", "ctr", "umoci", "skopeo", "containerd-shim-cocoon-v2"):
        if shutil.which(binary) is None:
            raise SystemExit(f"{binary} is not installed (make deps)")
    with tempfile.TemporaryDirectory(prefix="bp-", dir="/tmp") as tmp_s:
        d = Path(tmp_s)
        layout = make_layout(d / "image")
        busybox = export(layout, "latest", IMAGE, d / "busybox.tar")
        pause = export(layout, "pause", PAUSE, d / "pause.tar", cmd=PAUSE_CMD)
        proc = start_containerd(d, template_dir)
        try:
            for archive in (busybox, pause):
                subprocess.run(["ctr", "-a", f"{d}/c.sock", "-n", "k8s.io", "image", "import", str(archive)],
                               capture_output=True, check=True, timeout=300)  # fmt: skip
            pods = Pods(d)
            rows = []
            if template_dir:
                measure(pods, d, "cocoon", 1)  # builds the template: not counted
            for n in (1, args.parallel):
                results = {h: measure(pods, d, h, n) for h in ("runc", "cocoon")}
                (rt, rm), (ct, cm) = results["runc"], results["cocoon"]
                rows.append([n, f"{ct:.2f}", f"{rt:.2f}", f"{ct / rt:.1f}x", f"{cm:.1f}", f"{rm:.1f}",
                             f"{cm / rm:.1f}x"])  # fmt: skip
            header = ["pods", "cocoon s", "runc s", "ratio", "cocoon MiB/pod", "runc MiB/pod", "ratio"]
            print(table("pods through CRI (RunPodSandbox+CreateContainer+StartContainer to first output; "
                        f"PSS of the pod's host processes), cocoon {'from a template' if template_dir else 'cold'}",
                        header, rows))  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            subprocess.run(["umount", "-R", "-l", str(d)], capture_output=True, check=False)
            if template_dir:
                shutil.rmtree(template_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
