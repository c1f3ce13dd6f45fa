"""Pod networking through CRI and CNI: containerd (in a network namespace this test creates) sets up
each pod with the bridge + host-local plugins, dual stack; the shim wires the pod's namespace to its
VM. Checked: the guest got the pod's addresses, pod-to-pod across two VMs (IPv4 and IPv6, ping and
TCP), the host side (the bridge's namespace) reaching a pod, and nothing left after the pods go.

No traffic leaves the namespace: no masquerading, no port mapping, no default route out of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import helpers as h
import pytest
import shim_env
from helpers import IMAGE

pytestmark = pytest.mark.integration

if h.missing_binaries("containerd", "ctr", "ip", "nsenter") or not Path("/usr/lib/cni/bridge").exists():
    pytest.skip("containerd, iproute2 or the CNI plugins (containernetworking-plugins) are missing",
                allow_module_level=True)  # fmt: skip
try:
    from cri_api.v1 import api_pb2 as cri
except ImportError:  # pragma: no cover
    pytest.skip("container-runtime-interface-api is not installed (make deps)", allow_module_level=True)

SUBNET4, SUBNET6 = "10.99.0.0/24", "fd00:99::/64"
TIMEOUT = 180


def _conflist() -> dict:
    return {
        "cniVersion": "0.4.0", "name": "cocoon-test",
        "plugins": [{
            "type": "bridge", "bridge": "cni-cocoon", "isGateway": True, "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET4}], [{"subnet": SUBNET6}]],
                     "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]},
        }, {"type": "loopback"}],
    }  # fmt: skip


@pytest.fixture(scope="module")
def cni_containerd(session, shim_containerd, image_archive):
    """A second containerd like shim_containerd's, but in its own network namespace with CNI."""
    netns = f"cocoon-it-{os.getpid()}"
    h.run(["ip", "netns", "add", netns], check=True)
    ns_path = f"/run/netns/{netns}"
    try:
        h.run(["nsenter", f"--net={ns_path}", "ip", "link", "set", "lo", "up"], check=True)
        for key in ("all", "default"):  # addresses usable at once (no duplicate address detection wait)
            h.run(["nsenter", f"--net={ns_path}", "sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0"])
        c = shim_env.make(session.base, name="cni")
        (c.directory / "cni").mkdir()
        (c.directory / "cni" / "10-cocoon.conflist").write_text(json.dumps(_conflist()))
        c.daemon.argv = ["nsenter", f"--net={ns_path}", *c.daemon.argv]
        c.start()
        if not c.answers():
            pytest.skip(f"containerd cannot start in a network namespace here:\n{c.daemon.tail()}")
        for archive in (image_archive, session.base / "image" / "pause.tar"):
            c.ctr("image", "import", str(archive), ns=shim_env.NAMESPACE_CRI, timeout=120, check=True)
        yield c, ns_path
        c.daemon.stop()
        h.kill_pids(p.pid for p in c.shims())
        h.unmount_below(c.directory)
    finally:
        h.run(["ip", "netns", "delete", netns])


class NetPod:
    def __init__(self, c: shim_env.ShimContainerd, name: str) -> None:
        self.rt = c.runtime()
        logs = c.log_dir / name
        logs.mkdir(exist_ok=True)
        self.config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="default"),
            hostname=name, log_directory=str(logs),
            dns_config=cri.DNSConfig(servers=["10.99.0.53"], searches=["svc.cocoon.test"]))  # fmt: skip
        self.id = self.rt.RunPodSandbox(cri.RunPodSandboxRequest(config=self.config, runtime_handler="cocoon"),
                                        timeout=TIMEOUT).pod_sandbox_id  # fmt: skip
        status = self.rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=self.id), timeout=60).status
        ips = [status.network.ip, *(a.ip for a in status.network.additional_ips)]
        self.ip4 = next(ip for ip in ips if "." in ip)
        self.ip6 = next(ip for ip in ips if ":" in ip)
        cfg = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="app"), image=cri.ImageSpec(image=IMAGE),
                                  command=["sh", "-c", "while true; do echo pong | nc -l -p 8080; done"],
                                  log_path="app.log")  # fmt: skip
        self.cid = self.rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=self.id, config=cfg,
                                                                      sandbox_config=self.config),
                                           timeout=TIMEOUT).container_id  # fmt: skip
        self.rt.StartContainer(cri.StartContainerRequest(container_id=self.cid), timeout=TIMEOUT)

    def sh(self, script: str) -> tuple[int, str]:
        res = self.rt.ExecSync(cri.ExecSyncRequest(container_id=self.cid, cmd=["sh", "-c", script], timeout=60),
                               timeout=TIMEOUT)  # fmt: skip
        return res.exit_code, (res.stdout + res.stderr).decode(errors="replace")

    def remove(self) -> None:
        self.rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=self.id), timeout=TIMEOUT)
        self.rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=self.id), timeout=TIMEOUT)


def _links(ns_path: str) -> list[str]:
    out = h.run(["nsenter", f"--net={ns_path}", "ip", "-o", "link", "show"], check=True).stdout
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())


def test_dual_stack_pods_reach_each_other_and_the_host(cni_containerd):
    c, ns_path = cni_containerd
    links_before = _links(ns_path)
    pods: list[NetPod] = []
    try:
        a = NetPod(c, f"net-a-{os.getpid()}")
        pods.append(a)
        b = NetPod(c, f"net-b-{os.getpid()}")
        pods.append(b)
        assert len(c.vms()) == 2
        code, out = a.sh("ip -o addr show")
        assert code == 0 and a.ip4 in out and a.ip6 in out, out  # the guest has the pod's addresses
        code, out = a.sh("ip route; ip -6 route")
        assert "default via 10.99.0.1" in out, out
        # Hostname and DNS as the CRI gave them (containerd's resolv.conf/hostname/hosts mounts).
        code, out = a.sh("hostname; cat /etc/resolv.conf /etc/hostname")
        assert code == 0 and out.split()[0] == a.config.hostname, out
        assert "nameserver 10.99.0.53" in out and "search svc.cocoon.test" in out, out
        for ip in (b.ip4, b.ip6):
            code, out = a.sh(f"ping -c 2 -W 10 {ip}")
            assert code == 0, f"ping {ip} from pod a: {out}"
        for ip in (b.ip4, b.ip6):  # TCP, both families (the listener restarts between connections)
            deadline, got = time.monotonic() + 30, ""
            while time.monotonic() < deadline and "pong" not in got:
                _, got = a.sh(f"nc -w 5 {ip} 8080 </dev/null")
            assert "pong" in got, f"TCP to {ip}: {got}"
        # The bridge's side (the node, here the test namespace) reaches a pod.
        from cocoon.api.bundle import find_busybox

        for ping in ("ping", "ping6"):
            ip = a.ip4 if ping == "ping" else a.ip6
            host = h.run(["nsenter", f"--net={ns_path}", str(find_busybox()), ping, "-c", "2", "-W", "10", ip],
                         timeout=60)  # fmt: skip
            assert host.returncode == 0, host
    finally:
        for p in pods:
            with contextlib.suppress(Exception):
                p.remove()
    assert shim_env.wait_gone(c.vms) == []
    assert shim_env.wait_gone(c.shims) == []
    # CNI removed its veths; we removed our taps: the namespace is back to what it was.
    # (the bridge stays: CNI keeps it for the next pod)
    assert shim_env.wait_gone(lambda: sorted(set(_links(ns_path)) - set(links_before) - {"cni-cocoon"})) == []
