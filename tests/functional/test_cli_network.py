"""`cocoon network ID` through the real CLI: a created container whose spec names a pod network
namespace this test makes (tests/functional/netns_helpers.py) shows the pod's interface, MAC, MTU,
addresses and routes as its guest has them; a container without a network shows only `lo`; a
stopped one is refused. The answers come from the guest agent through the container's monitor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns_helpers import pod_network

from cocoon.api.bundle import make_bundle
from cocoon.api.state import StateStore, Status, refresh_status

pytestmark = pytest.mark.vm


ENV = {**os.environ, "COCOON_CONFIG": ""}


def _cocoon(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "cocoon.cli.main", "--root", str(root), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, env=ENV)


def _create(root: Path, tmp_path: Path, cid: str, netns: str | None) -> None:
    bundle = make_bundle(tmp_path / cid, ["sleep", "600"])
    if netns is not None:
        doc = json.loads((bundle / "config.json").read_text())
        for ns in doc["linux"]["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = netns
        (bundle / "config.json").write_text(json.dumps(doc))
    # As with runc, the container keeps create's stdout/stderr: files, not the pipes run() would wait on.
    with (tmp_path / f"{cid}.out").open("w") as out, (tmp_path / f"{cid}.err").open("w") as err:
        proc = subprocess.run([sys.executable, "-m", "cocoon.cli.main", "--root", str(root), "create", "--bundle",
                               str(bundle), cid], stdout=out, stderr=err, stdin=subprocess.DEVNULL, timeout=120,
                              env=ENV, check=False)  # fmt: skip
    assert proc.returncode == 0, (tmp_path / f"{cid}.err").read_text()


def _delete(root: Path, cid: str) -> None:
    out = _cocoon(root, "delete", "--force", cid)
    assert out.returncode == 0, out.stderr


@pytest.fixture
def root(cfg, tmp_path, no_leaks) -> Path:
    return tmp_path / "root"


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_network_of_a_container_on_a_pod_namespace(root, tmp_path):
    with pod_network("clinet", mtu=1400) as net:
        _create(root, tmp_path, "cn1", net.pod_path)
        try:
            table = _cocoon(root, "network", "cn1")
            as_json = _cocoon(root, "network", "--format", "json", "cn1")
        finally:
            _delete(root, "cn1")
        assert table.returncode == 0, table.stderr
        assert as_json.returncode == 0, as_json.stderr
        doc = json.loads(as_json.stdout)
        mac = net.pod_mac()
    assert doc["id"] == "cn1"
    by_name = {i["name"]: i for i in doc["interfaces"]}
    assert set(by_name) == {"lo", "eth0"}, doc
    eth0 = by_name["eth0"]
    assert eth0["mac"] == mac and eth0["mtu"] == 1400 and eth0["up"] and not eth0["loopback"], eth0
    assert {"10.77.0.2/24", "fd77::2/64"} <= set(eth0["addresses"]), eth0  # plus the guest's own fe80::
    assert by_name["lo"]["loopback"] and "127.0.0.1/8" in by_name["lo"]["addresses"]
    defaults = {(r["family"], r["gateway"], r["device"]) for r in doc["routes"] if r["dest"] == "default"}
    assert defaults == {("ipv4", "10.77.0.1", "eth0"), ("ipv6", "fd77::1", "eth0")}, doc["routes"]
    # The table says the same in words.
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["INTERFACE", "MAC", "MTU"]
    assert any(line.split()[:4] == ["eth0", mac, "1400", "up"] and "10.77.0.2/24" in line for line in lines)
    assert "  default via 10.77.0.1 dev eth0" in lines and "  -6 default via fd77::1 dev eth0" in lines


def test_network_of_a_container_without_one_is_lo_only(root, tmp_path):
    _create(root, tmp_path, "cn2", None)
    try:
        out = _cocoon(root, "network", "-f", "json", "cn2")
        assert out.returncode == 0, out.stderr
        assert _cocoon(root, "kill", "cn2", "KILL").returncode == 0
        deadline = time.monotonic() + 30
        while refresh_status(StateStore(root).load("cn2")).status != Status.STOPPED:
            assert time.monotonic() < deadline, "cn2 did not stop"
            time.sleep(0.1)
        stopped = _cocoon(root, "network", "cn2")
    finally:
        _delete(root, "cn2")
    doc = json.loads(out.stdout)
    assert [i["name"] for i in doc["interfaces"]] == ["lo"], doc
    assert doc["interfaces"][0]["up"] and "127.0.0.1/8" in doc["interfaces"][0]["addresses"]
    assert not [r for r in doc["routes"] if r["dest"] == "default" or r["device"] != "lo"], doc["routes"]
    assert stopped.returncode == 1 and "it is stopped" in stopped.stderr, stopped.stderr


HOOK = """#!/bin/sh
# A prestart hook doing what docker's libnetwork does: fill the container's new network namespace,
# found through the state's PID, with a veth (its peer end in the test's namespace) and addresses.
set -e
pid=$(sed -n 's/.*"pid": *\\([0-9]*\\).*/\\1/p')
ip link add eth0 netns "$pid" type veth peer name hook-peer netns "$1"
nsenter --net=/proc/$pid/ns/net ip addr add 10.56.0.2/24 dev eth0
nsenter --net=/proc/$pid/ns/net ip link set eth0 up
nsenter --net=/proc/$pid/ns/net ip route add default via 10.56.0.1
nsenter --net=/run/netns/$1 ip addr add 10.56.0.1/24 dev hook-peer
nsenter --net=/run/netns/$1 ip link set hook-peer up
# Hooks run in the host's network namespace, as runc runs them.
[ "$(readlink /proc/self/ns/net)" = "$2" ]
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_prestart_hook_fills_the_new_network_namespace(root, tmp_path):
    # A spec asking for a new network namespace (no path) gets one before its prestart hooks run:
    # whatever they put there (docker's bridge networks work this way) reaches the VM.
    from netns_helpers import _off_loop, _remove, links_of
    from pyroute2 import netns

    peer = f"chook-{os.getpid()}"
    _off_loop(netns.create)(peer)
    try:
        hook = tmp_path / "net-hook"
        hook.write_text(HOOK)
        hook.chmod(0o755)
        bundle = make_bundle(tmp_path / "hk", ["sh", "-c", "ip -o -4 addr show eth0; ping -c 2 -W 10 10.56.0.1"])
        doc = json.loads((bundle / "config.json").read_text())
        doc["hooks"] = {"prestart": [{"path": str(hook), "args": ["net-hook", peer, os.readlink("/proc/self/ns/net")]}]}
        for caps in doc["process"]["capabilities"].values():
            caps.append("CAP_NET_RAW")  # ping
        (bundle / "config.json").write_text(json.dumps(doc))
        out = _cocoon(root, "run", "--bundle", str(bundle), "hk")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "10.56.0.2/24" in out.stdout, out.stdout
        assert "2 packets received" in out.stdout, out.stdout
        # The namespace died with the sandbox, and with it the veth: its peer end is gone too.
        deadline = time.monotonic() + 10
        while "hook-peer" in links_of(peer):
            assert time.monotonic() < deadline, links_of(peer)
            time.sleep(0.1)
    finally:
        _remove(peer)
