"""podman with its own netavark bridge, running inside a network namespace this test creates (the
"host" of the test): podman makes the container's namespace (a veth on a dual-stack bridge) and
cocoon wires it to the container's VM. Checked: the guest has the addresses netavark gave, reaches
the bridge (the host side) by ping and TCP over IPv4 and IPv6, and a listener in the container is
reachable from the test namespace over both families; after ``rm`` no VM, tap or namespace is left.

netavark's iptables rules (NAT chains, forwarding) go into the test namespace, never the host's;
there is no port mapping and nothing routes out of the test namespace. Its IPAM database is
podman's fixed ``/run/containers/networks/ipam.db`` (keyed by network name: ours is unique).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import helpers as h
import pytest
from helpers import IMAGE

pytestmark = pytest.mark.integration

NETAVARK = "/usr/lib/podman/netavark"
SUBNET4, GATEWAY4 = "10.98.0.0/24", "10.98.0.1"
SUBNET6, GATEWAY6 = "fd00:98::/64", "fd00:98::1"
LISTENER = "while :; do echo pong | nc -l -p 8080; done"

if h.missing_binaries("podman", "conmon", "ip", "nsenter", "iptables"):
    pytest.skip("podman, conmon, iproute2, nsenter or iptables is missing", allow_module_level=True)
if not os.access(NETAVARK, os.X_OK):
    pytest.skip(f"netavark is not installed ({NETAVARK}; apt-get install netavark)", allow_module_level=True)


@dataclass
class NetPodman:
    """A private podman (netavark backend) whose every command runs inside the test namespace."""

    directory: Path
    netns: str  # path of the test namespace
    cocoon: str
    env: dict[str, str]
    network: str

    def argv(self, *args: str) -> list[str]:
        d = self.directory
        return ["nsenter", f"--net={self.netns}", "podman", "--root", str(d / "root"), "--runroot",
                str(d / "runroot"), "--tmpdir", str(d / "tmp"), "--cgroup-manager", "cgroupfs",
                "--events-backend", "file", "--runtime", self.cocoon, *args]  # fmt: skip

    def __call__(self, *args: str, timeout: float = 120, check: bool = False) -> h.Result:
        return h.run(self.argv(*args), timeout=timeout, env=self.env, check=check)

    def in_netns(self, *argv: str, timeout: float = 60) -> h.Result:
        return h.run(["nsenter", f"--net={self.netns}", *argv], timeout=timeout)


@pytest.fixture(scope="module")
def net_podman(session, image_archive):
    name = f"cocoon-pn-{os.getpid()}"
    ns_path = f"/run/netns/{name}"
    h.run(["ip", "netns", "add", name], check=True)
    d = session.base / "podman-net"
    try:
        h.run(["nsenter", f"--net={ns_path}", "ip", "link", "set", "lo", "up"], check=True)
        for key in ("all", "default"):  # addresses usable at once (no duplicate address detection wait)
            h.run(["nsenter", f"--net={ns_path}", "sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0"])
        d.mkdir()
        conf = d / "containers.conf"
        conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'  # no CAP_SYS_RESOURCE here
            'log_driver = "k8s-file"\n'
            "[network]\n"
            'network_backend = "netavark"\n'
            f'network_config_dir = "{d}/networks"\n'  # never the host's /etc/containers/networks
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
        )
        env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        env.pop("CONTAINERS_STORAGE_CONF", None)
        p = NetPodman(d, ns_path, session.cocoon, env, network=name)
        backend = p("info", "--format", "{{.Host.NetworkBackend}}", timeout=60)
        if backend.returncode != 0 or backend.stdout.strip() != "netavark":
            pytest.skip(f"podman cannot use netavark here: {backend}")
        made = p("network", "create", "--disable-dns", "--subnet", SUBNET4, "--ipv6", "--subnet", SUBNET6, name)
        if made.returncode != 0:
            pytest.skip(f"podman cannot create a dual-stack netavark network here: {made}")
        session.add_root(session.default_root)
        p("load", "-i", str(image_archive), timeout=120, check=True)
        yield p
        p("rm", "--all", "--force", "--time", "0", timeout=120)
        p("network", "rm", "--force", name, timeout=60)
    finally:
        for proc in h.descendants_and_marked(str(d)):
            if "conmon" in proc.cmdline:
                h.kill_pids([proc.pid])
        h.unmount_below(d)
        h.run(["ip", "netns", "delete", name])


def _links(p: NetPodman) -> set[str]:
    out = p.in_netns("ip", "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _netns_files() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


# A listener in the test namespace (the host side): one line from each of two clients, any family.
_HOST_LISTENER = """
import socket, sys
srv = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True)
srv.settimeout(60)
print("listening", flush=True)
for _ in range(2):
    conn, peer = srv.accept()
    with conn:
        conn.settimeout(30)
        print(peer[0], conn.makefile().readline().strip(), flush=True)
"""


def test_dual_stack_container_on_netavark_bridge(net_podman, session):
    p = net_podman
    links_before, netns_before = _links(p), _netns_files()
    name = f"web-{os.getpid()}"
    started = time.monotonic()
    out = p("run", "-d", "--name", name, "--network", p.network, IMAGE, "sh", "-c", LISTENER)
    full_id = out.stdout.strip()
    host_listener: subprocess.Popen[str] | None = None
    try:
        assert out.returncode == 0 and full_id, out
        fmt = "{{json .NetworkSettings.Networks}} {{.NetworkSettings.SandboxKey}}"
        networks, _, sandbox_key = p("inspect", "--format", fmt, name, check=True).stdout.strip().rpartition(" ")
        entry = json.loads(networks)[p.network]
        ip4, ip6, mac = entry["IPAddress"], entry["GlobalIPv6Address"], entry["MacAddress"]
        assert ip4.startswith("10.98.0.") and ip6.startswith("fd00:98::"), entry
        # It runs in a cocoon VM, wired to podman's namespace by a tap (tcfilter, the default model).
        assert any(full_id in proc.cmdline for proc in h.ours(session.markers).values() if h.is_vmm(proc))
        wired = h.run(["nsenter", f"--net={sandbox_key}", "ip", "-o", "link", "show"], check=True).stdout
        assert "tap0_cocoon" in wired, wired

        res = p("exec", name, "sh", "-c", "ip -o addr show eth0; ip -o link show eth0; ip route; ip -6 route")
        assert res.returncode == 0, res
        assert f"{ip4}/24" in res.stdout and f"{ip6}/64" in res.stdout and mac in res.stdout, res
        assert f"default via {GATEWAY4}" in res.stdout and f"default via {GATEWAY6}" in res.stdout, res

        # The container reaches the host side (the bridge in the test namespace): ping and TCP, both families.
        host_listener = subprocess.Popen(
            ["nsenter", f"--net={p.netns}", sys.executable, "-c", _HOST_LISTENER, "9090"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        assert host_listener.stdout is not None
        assert host_listener.stdout.readline().strip() == "listening"
        script = (
            f"ping -c 2 -W 10 {GATEWAY4} && ping6 -c 2 -W 10 {GATEWAY6} && "
            f"echo from-guest-v4 | nc -w 10 {GATEWAY4} 9090 && echo from-guest-v6 | nc -w 10 {GATEWAY6} 9090"
        )
        res = p("exec", name, "sh", "-c", script)
        assert res.returncode == 0, res
        got, _ = host_listener.communicate(timeout=30)
        assert f"::ffff:{ip4} from-guest-v4" in got and f"{ip6} from-guest-v6" in got, got

        # A listener in the container is reachable from the test namespace, both families (it restarts
        # between connections: retry until it answers).
        from cocoon.api.bundle import find_busybox

        busybox = str(find_busybox())
        for ip in (ip4, ip6):
            deadline, reply = time.monotonic() + 30, ""
            while time.monotonic() < deadline and "pong" not in reply:
                reply = p.in_netns(busybox, "nc", "-w", "5", ip, "8080").stdout
                if "pong" not in reply:
                    time.sleep(0.3)
            assert "pong" in reply, f"TCP to the container at {ip}: {reply!r}"
        for ping, ip in (("ping", ip4), ("ping6", ip6)):
            res = p.in_netns(busybox, ping, "-c", "2", "-W", "10", ip)
            assert res.returncode == 0, res
    finally:
        if host_listener is not None and host_listener.poll() is None:
            host_listener.kill()
            host_listener.communicate()
        rm = p("rm", "--force", "--time", "0", name)
    assert rm.returncode == 0, rm
    h.wait_for(lambda: not [x for x in h.ours(session.markers).values() if full_id in x.cmdline], 30,
               "the container's VM and monitor to go")  # fmt: skip
    # netavark removed the container's namespace (with our tap and qdiscs in it), its veth and, with
    # no container left, the bridge: the test namespace is back to what it was.
    h.wait_for(lambda: _netns_files() - netns_before == set(), 10, "podman's container namespace to go")
    assert not Path(sandbox_key).exists()
    assert _links(p) - links_before == set()
    assert full_id not in h.containers_in(session.default_root)
    assert time.monotonic() - started < 90
