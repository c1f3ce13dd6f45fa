"""Docker's default bridge network with ``--runtime cocoon``: dockerd runs inside a network
namespace this test creates (its docker0 bridge lives there, no iptables rules), so nothing of
the host's network changes and no traffic leaves the namespace.

docker wires a bridge network with a prestart hook (``libnetwork-setkey``) that hands it
``/proc/<pid>/ns/net`` of the runtime's PID; cocoon's monitor makes that namespace before the
hook runs and wires what docker put there (a veth with the container's address) into the VM.
Checked: the guest has docker's address, reaches the bridge, a listener in the container is
reachable from the bridge's side, and after ``--rm`` no VM or namespace is left.
"""

from __future__ import annotations

import os
import time

import helpers as h
import pytest
from conftest import run_docker
from helpers import IMAGE

pytestmark = pytest.mark.integration

if h.missing_binaries("dockerd", "docker", "ip", "nsenter"):
    pytest.skip("docker.io, iproute2 or nsenter is missing", allow_module_level=True)


@pytest.fixture(scope="module")
def net_docker(session, image_archive):
    name = f"cocoon-dk-{os.getpid()}"
    ns_path = f"/run/netns/{name}"
    h.run(["ip", "netns", "add", name], check=True)
    try:
        h.run(["nsenter", f"--net={ns_path}", "ip", "link", "set", "lo", "up"], check=True)
        with run_docker(session, image_archive, name="docker-net", netns=ns_path) as k:
            yield k, ns_path
    finally:
        h.run(["ip", "netns", "delete", name])


def test_bridge_network(net_docker, cid):
    k, ns_path = net_docker
    from cocoon.api.bundle import find_busybox

    out = k("run", "--runtime", "cocoon", "--rm", "--name", cid, IMAGE, "sh", "-c",
            "ip -o -4 addr show eth0; ip route; ping -c 2 -W 10 172.17.0.1")  # fmt: skip
    assert out.returncode == 0, out
    assert "inet 172.17." in out.stdout and "default via 172.17.0.1" in out.stdout, out.stdout
    assert "2 packets received" in out.stdout, out.stdout
    # A listener in the container, reached from the bridge's side (the test namespace).
    served = f"{cid}-srv"
    run = k("run", "--runtime", "cocoon", "-d", "--name", served, IMAGE, "sh", "-c",
            "while true; do echo pong | nc -l -p 8080; done")  # fmt: skip
    assert run.returncode == 0, run
    try:
        ip = k("inspect", "-f", "{{.NetworkSettings.IPAddress}}", served, check=True).stdout.strip()
        assert ip.startswith("172.17."), ip
        got, deadline = "", time.monotonic() + 60
        while "pong" not in got and time.monotonic() < deadline:  # until the guest's nc listens
            got = h.run(["nsenter", f"--net={ns_path}", str(find_busybox()), "nc", "-w", "5", ip, "8080"],
                        timeout=30).stdout  # fmt: skip
            time.sleep(0.5)
        assert "pong" in got, got
    finally:
        assert k("rm", "-f", served, timeout=120).returncode == 0
    assert k("ps", "-aq").stdout.strip() == ""
