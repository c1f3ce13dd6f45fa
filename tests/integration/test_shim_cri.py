"""Kubernetes' view: a CRI client (PyPI container-runtime-interface-api) drives containerd's CRI plugin,
which runs pods with containerd-shim-cocoon-v2, ``runtime_handler="cocoon"`` as a RuntimeClass sends it.

Every container of a pod runs in the pod's one VM. Faults: a container OOM-killed in the guest,
the shim SIGKILLed (containerd's ``shim delete`` must leave no VM, mount or socket), containerd
restarted under a running pod (the shim keeps running; containerd reconnects).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import helpers as h
import pytest
import shim_env
from helpers import IMAGE

pytestmark = pytest.mark.integration

if h.missing_binaries("containerd", "ctr"):
    pytest.skip("containerd is not installed", allow_module_level=True)
try:
    from cri_api.v1 import api_pb2 as cri
except ImportError:  # pragma: no cover
    pytest.skip("container-runtime-interface-api is not installed (make deps)", allow_module_level=True)

TIMEOUT = 180


def _pod_config(c: shim_env.ShimContainerd, name: str) -> cri.PodSandboxConfig:
    logs = c.log_dir / name
    logs.mkdir(exist_ok=True)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="default"),
        hostname=name, log_directory=str(logs),
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
            namespace_options=cri.NamespaceOption(network=cri.NODE))),
    )  # fmt: skip


def _container(name: str, command: list[str], memory: int = 0) -> cri.ContainerConfig:
    resources = cri.LinuxContainerResources(memory_limit_in_bytes=memory) if memory else None
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image=IMAGE),
                               command=command, log_path=f"{name}.log",
                               linux=cri.LinuxContainerConfig(resources=resources))  # fmt: skip


class Pod:
    def __init__(self, c: shim_env.ShimContainerd, name: str) -> None:
        self.c, self.rt, self.config = c, c.runtime(), _pod_config(c, name)
        self.id = self.rt.RunPodSandbox(cri.RunPodSandboxRequest(config=self.config, runtime_handler="cocoon"),
                                        timeout=TIMEOUT).pod_sandbox_id  # fmt: skip

    def run(self, name: str, command: list[str], memory: int = 0) -> str:
        cid = self.rt.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=self.id, config=_container(name, command, memory), sandbox_config=self.config),
            timeout=TIMEOUT).container_id  # fmt: skip
        self.rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=TIMEOUT)
        return cid

    def status(self, cid: str) -> cri.ContainerStatus:
        return self.rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid), timeout=60).status

    def remove(self) -> None:
        self.rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=self.id), timeout=TIMEOUT)
        self.rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=self.id), timeout=TIMEOUT)


def _nothing_left(c: shim_env.ShimContainerd) -> None:
    assert shim_env.wait_gone(c.shims) == [], "a shim outlived its pod"
    assert shim_env.wait_gone(c.vms) == [], "a VM outlived its pod"
    assert shim_env.wait_gone(c.shim_dirs) == [], "a shim's state directory was left"
    assert h.mounts_below(c.cocoon_root) == []
    assert [m for m in h.mounts_below(c.directory / "state") if m.endswith("/rootfs")] == []


def _log_lines(path: Path) -> list[tuple[str, str]]:
    """(stream, text) of each line of a CRI log file ("<time> <stream> <tag> <text>")."""
    return [(line.split(" ", 3)[1], line.split(" ", 3)[3]) for line in path.read_text().splitlines()]


@pytest.fixture
def pod(shim_containerd, request):
    pods: list[Pod] = []

    def make(name: str = "") -> Pod:
        p = Pod(shim_containerd, name or f"pod-{os.getpid()}-{len(pods)}")
        pods.append(p)
        return p

    yield make
    for p in pods:
        with contextlib.suppress(Exception):  # best effort: the leak check below reports what stayed
            p.remove()
    _nothing_left(shim_containerd)


def test_two_containers_share_one_vm(shim_containerd, pod):
    c = shim_containerd
    p = pod()
    assert len(c.vms()) == 1, "RunPodSandbox returns once the VM runs"
    web = p.run("web", ["sh", "-c", "echo hello-web; echo err-web >&2; sleep 1000"])
    side = p.run("side", ["sh", "-c", "echo hello-side; hostname; sleep 1000"])
    assert len(c.vms()) == 1, "the pod's containers must share one VM"
    assert len(c.shims()) == 1, "one shim per pod"

    res = p.rt.ExecSync(cri.ExecSyncRequest(container_id=web, cmd=["sh", "-c", "echo out; echo err >&2; exit 3"],
                                            timeout=60), timeout=TIMEOUT)  # fmt: skip
    assert (res.stdout, res.stderr, res.exit_code) == (b"out\n", b"err\n", 3)
    assert p.status(web).state == cri.CONTAINER_RUNNING

    stats = p.rt.ContainerStats(cri.ContainerStatsRequest(container_id=web), timeout=60).stats
    assert stats.memory.usage_bytes.value > 0
    assert stats.cpu.usage_core_nano_seconds.value > 0

    logs = Path(p.config.log_directory)
    h.wait_for(lambda: (logs / "side.log").exists() and len(_log_lines(logs / "side.log")) >= 2, 30, "side's log")
    assert ("stdout", "hello-web") in _log_lines(logs / "web.log")
    assert ("stderr", "err-web") in _log_lines(logs / "web.log")
    assert ("stdout", p.config.hostname) in _log_lines(logs / "side.log")

    p.rt.StopContainer(cri.StopContainerRequest(container_id=web, timeout=2), timeout=TIMEOUT)
    stopped = p.status(web)
    assert stopped.state == cri.CONTAINER_EXITED
    assert stopped.exit_code == 137  # sh ignores SIGTERM as PID 1: killed after the grace period
    assert p.status(side).state == cri.CONTAINER_RUNNING
    assert len(c.vms()) == 1


def test_oom_kill_is_reported(shim_containerd, pod):
    p = pod()
    # dd's 64 MiB buffer does not fit in a 32 MiB limit: the guest kernel kills it.
    cid = p.run("hog", ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=4"], memory=32 << 20)
    h.wait_for(lambda: p.status(cid).state == cri.CONTAINER_EXITED, 60, "the hog to be killed")
    status = p.status(cid)
    assert status.exit_code == 137, status
    assert status.reason == "OOMKilled", status  # CRI's reason comes from our TaskOOM event


def test_shim_killed_is_cleaned_up_by_shim_delete(shim_containerd, pod):
    c = shim_containerd
    p = pod()
    cid = p.run("app", ["sleep", "1000"])
    (shim,) = c.shims()
    os.kill(shim.pid, signal.SIGKILL)
    # The VM and virtiofsd die with their owner; containerd sees the shim go and runs `shim delete`.
    assert shim_env.wait_gone(c.vms) == []
    assert shim_env.wait_gone(c.shim_dirs) == [], "shim delete must remove the dead shim's state"
    assert shim_env.wait_gone(lambda: [m for m in h.mounts_below(c.directory) if m.endswith("/rootfs")]) == []
    h.wait_for(lambda: p.status(cid).state == cri.CONTAINER_EXITED, 30, "the container to show as exited")


def test_containerd_restart_keeps_the_pod(shim_containerd, pod):
    c = shim_containerd
    p = pod()
    cid = p.run("app", ["sleep", "1000"])
    shims = c.shims()
    c.restart()
    assert c.answers()
    assert c.shims() == shims, "the shim must survive containerd"
    p.rt = c.runtime()
    deadline = time.monotonic() + 30
    while p.status(cid).state != cri.CONTAINER_RUNNING and time.monotonic() < deadline:
        time.sleep(0.5)
    assert p.status(cid).state == cri.CONTAINER_RUNNING
    res = p.rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["echo", "still-here"], timeout=60),
                        timeout=TIMEOUT)  # fmt: skip
    assert (res.stdout, res.exit_code) == (b"still-here\n", 0)
