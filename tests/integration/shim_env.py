"""A private containerd with its CRI plugin on, running cocoon's shim v2 (``io.containerd.cocoon.v2``).

    <base>/shim/
        config.toml, root, state, c.sock, c.sock.ttrpc, containerd.log   containerd's
        cocoon.toml    COCOON_CONFIG of containerd and so of every shim: runtime.root below
        root/          cocoon's state root: s/<hash>/ per shim (sockets, share, logs)
        logs/          CRI container logs

Pods use the node's network (no CNI here: networking has its own tests). The pause image is
built locally; the shim never runs its process (it behaves like pause without a guest process).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helpers as h

NAMESPACE_CRI = "k8s.io"
NAMESPACE_CTR = "shimtest"
PAUSE_IMAGE = "localhost/cocoon-pause:latest"
RUNTIME = "io.containerd.cocoon.v2"


def pause_archive(layout: Path, out: Path) -> Path:
    """The busybox layout of the session's image, tagged as a pause image (its command is never run)."""
    from cocoon.api.demo_image import PAUSE_CMD, export

    return export(layout, "pause", PAUSE_IMAGE, out, cmd=PAUSE_CMD)


@dataclass
class ShimContainerd:
    directory: Path
    daemon: h.Daemon

    @property
    def sock(self) -> str:
        return str(self.directory / "c.sock")

    @property
    def cocoon_root(self) -> Path:
        return self.directory / "root"

    @property
    def log_dir(self) -> Path:
        return self.directory / "logs"

    def ctr(self, *args: str, ns: str = NAMESPACE_CTR, timeout: float = 120, check: bool = False) -> h.Result:
        return h.run(["ctr", "-a", self.sock, "-n", ns, *args], timeout=timeout, check=check)

    def shims(self) -> list[h.Proc]:
        return [p for p in h.processes().values() if "cocoon.shim" in p.cmdline and self.sock in p.cmdline]

    def vms(self) -> list[h.Proc]:
        root = str(self.cocoon_root)
        return [
            p for p in h.processes().values() if Path(p.argv[0]).name.startswith("qemu-system") and root in p.cmdline
        ]

    def shim_dirs(self) -> list[Path]:
        base = self.cocoon_root / "s"
        return sorted(base.iterdir()) if base.is_dir() else []

    def runtime(self) -> Any:
        """A CRI RuntimeService client."""
        import grpc
        from cri_api.v1 import api_pb2_grpc

        return api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(f"unix://{self.sock}"))

    def start(self) -> None:
        self.daemon.start()
        with contextlib.suppress(AssertionError):
            h.wait_for(lambda: not self.daemon.alive() or self.ctr("version", timeout=10).returncode == 0, 30,
                       "containerd to answer")  # fmt: skip

    def restart(self) -> None:
        self.daemon.stop()
        self.start()

    def answers(self) -> bool:
        return self.daemon.alive() and self.ctr("version", timeout=10).returncode == 0


def make(base: Path, name: str = "shim") -> ShimContainerd:
    d = base / name
    d.mkdir()
    (d / "logs").mkdir()
    (d / "cocoon.toml").write_text(f'[runtime]\nroot = "{d}/root"\n')
    (d / "config.toml").write_text(
        "version = 2\n"
        f'root = "{d}/root-containerd"\n'
        f'state = "{d}/state"\n'
        "[grpc]\n"
        f'  address = "{d}/c.sock"\n'
        "[ttrpc]\n"
        f'  address = "{d}/c.sock.ttrpc"\n'
        "[debug]\n"
        '  level = "info"\n'
        '[plugins."io.containerd.grpc.v1.cri"]\n'
        "  restrict_oom_score_adj = true\n"  # no CAP_SYS_RESOURCE here
        f'  sandbox_image = "{PAUSE_IMAGE}"\n'
        "  disable_tcp_service = true\n"
        '  stream_server_address = "127.0.0.1"\n'
        '  [plugins."io.containerd.grpc.v1.cri".containerd]\n'
        '    default_runtime_name = "cocoon"\n'
        '    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.cocoon]\n'
        f'      runtime_type = "{RUNTIME}"\n'
        '  [plugins."io.containerd.grpc.v1.cri".cni]\n'
        '    bin_dir = "/usr/lib/cni"\n'
        f'    conf_dir = "{d}/cni"\n'
    )
    env = {**os.environ, "COCOON_CONFIG": str(d / "cocoon.toml")}
    daemon = h.Daemon("containerd", ["containerd", "--config", str(d / "config.toml")], d / "containerd.log", env=env)
    return ShimContainerd(d, daemon)


def wait_gone(what: Any, timeout: float = 30.0) -> list[Any]:
    """Poll ``what()`` until it returns nothing; what is left after ``timeout``."""
    deadline = time.monotonic() + timeout
    left = what()
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = what()
    return list(left)
