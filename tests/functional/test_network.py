"""Pod networking: discovery and wiring in namespaces the tests make (no VM), then real sandboxes
whose VM is wired to a pod namespace, checked with ping and TCP both ways, IPv4 and IPv6.

Every namespace is created here (tests/functional/netns_helpers.py) and removed afterwards; no
traffic leaves them.
"""

from __future__ import annotations

import json
import os
import select
import threading
import time

import pytest
from netns_helpers import add_link, links_of, pod_network, qdiscs_of

from cocoon.agent.netlink import Netlink
from cocoon.agent.network import GuestNetwork
from cocoon.errors import InvalidArgument, NetworkError, NotFound
from cocoon.network import discover, wired
from cocoon.network.netns import run_in_netns
from cocoon.protocol.types import IPAddress, IPFamily, NetInterface, NetNeighbor, NetRoute

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


# -- discovery (no VM) ---------------------------------------------------------------------------
def test_discover_dual_stack():
    with pod_network("disc", neighbor=True) as net:
        info = discover(net.pod_path)
        assert [i.name for i in info.interfaces] == ["eth0"]
        eth0 = info.interfaces[0]
        assert eth0.kind == "veth" and eth0.mtu == 1500 and eth0.hw_addr == net.pod_mac()
        assert set(eth0.addresses) == {IPAddress("10.77.0.2", 24), IPAddress("fd77::2", 64)}
        defaults = {(r.family, r.gateway) for r in info.routes if r.is_default}
        assert defaults == {(IPFamily.V4, "10.77.0.1"), (IPFamily.V6, "fd77::1")}
        assert all(r.device == "eth0" for r in info.routes)
        assert NetNeighbor("10.77.0.99", "02:00:00:00:00:99", "eth0") in info.neighbors


def test_discover_ipv6_only_skips_link_local():
    with pod_network("v6only", v4=False) as net:
        time.sleep(0.1)  # the kernel adds fe80:: once the link is up
        info = discover(net.pod_path)
        assert info.interfaces[0].addresses == (IPAddress("fd77::2", 64),)
        assert [r.dest for r in info.routes] == ["::/0"]


@pytest.mark.parametrize("kind", ["dummy", "bridge"])
def test_discover_refuses_an_interface_kind_it_cannot_wire(kind):
    with pod_network(f"k{kind[:3]}") as net:
        try:
            add_link(net.pod, ifname="odd0", kind=kind)
        except Exception as exc:  # pyroute2 NetlinkError: this host kernel lacks the kind
            pytest.skip(f"cannot make a {kind} here: {exc}")
        with pytest.raises(NetworkError, match=f"cannot wire a {kind} interface") as err:
            discover(net.pod_path)
        assert err.value.context["interface"] == "odd0" and err.value.context["kind"] == kind
        assert err.value.context["netns"] == net.pod_path


def test_discover_bad_namespace_paths(tmp_path):
    with pytest.raises(NotFound, match="network namespace not found"):
        discover(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidArgument, match="not a network namespace"):
        discover(str(tmp_path / "file"))
    # The host's own namespace is never wired (its interfaces would vanish into a VM).
    with pytest.raises(InvalidArgument, match="host's own"):
        discover(f"/proc/{os.getpid()}/ns/net")


def test_a_spec_naming_the_host_namespace_gets_no_wiring(tmp_path):
    # `docker run --network host` names the host's namespace: the VM keeps its own stack instead.
    from cocoon.api.bundle import make_bundle
    from cocoon.api.pod_network import spec_netns
    from cocoon.oci.spec import load

    bundle = make_bundle(tmp_path / "b", ["true"])
    config = json.loads((bundle / "config.json").read_text())
    namespaces = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "network"]
    config["linux"]["namespaces"] = namespaces
    namespaces.append({"type": "network", "path": f"/proc/{os.getpid()}/ns/net"})
    (bundle / "config.json").write_text(json.dumps(config))
    assert spec_netns(load(bundle)) == ""
    namespaces[-1]["path"] = str(tmp_path / "gone")
    (bundle / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotFound, match="network namespace not found"):
        spec_netns(load(bundle))


# -- wiring (no VM) ------------------------------------------------------------------------------
def _ping_from_peer(net, count=3):
    return threading.Thread(target=net.in_peer, args=(["busybox", "ping", "-c", str(count), "-W", "1",
                                                        net.pod_v4],), daemon=True)  # fmt: skip


@pytest.mark.parametrize("model", ["tcfilter", "macvtap"])
def test_wiring_delivers_frames_and_is_undone(model):
    with pod_network(f"w{model[:3]}") as net:
        info = discover(net.pod_path)
        with wired(info, model) as nics:
            assert len(nics) == 1 and nics[0].interface.name == "eth0"
            device = nics[0].device
            assert device in links_of(net.pod)
            if model == "tcfilter":
                assert ("eth0", "ingress") in qdiscs_of(net.pod) and (device, "ingress") in qdiscs_of(net.pod)
            pinger = _ping_from_peer(net)
            pinger.start()
            # The peer's ARP request for the pod's address reaches the VM's side of the tap
            # (a virtio-net header first: the fd has IFF_VNET_HDR).
            ready, _, _ = select.select([nics[0].fd], [], [], 5)
            assert ready, "no frame reached the tap"
            frame = os.read(nics[0].fd, 4096)
            assert len(frame) > 12 + 14
            pinger.join(5)
        assert set(links_of(net.pod)) == {"lo", "eth0"}
        assert qdiscs_of(net.pod) == []


def test_two_pods_macvtaps_each_get_their_own_queue():
    # ifindexes are per namespace, /dev/tap<ifindex> is not: equal namespaces must not share a node.
    with pod_network("mta") as a, pod_network("mtb") as b:
        with wired(discover(a.pod_path), "macvtap") as nics_a, wired(discover(b.pod_path), "macvtap") as nics_b:
            rdev_a, rdev_b = os.fstat(nics_a[0].fd).st_rdev, os.fstat(nics_b[0].fd).st_rdev
            assert rdev_a != rdev_b
            pinger = _ping_from_peer(b)
            pinger.start()
            ready, _, _ = select.select([nics_b[0].fd], [], [], 5)
            assert ready, "b's frames must reach b's queue"
            assert select.select([nics_a[0].fd], [], [], 0.5)[0] == [], "and never a's"
            pinger.join(5)
        assert set(links_of(a.pod)) == set(links_of(b.pod)) == {"lo", "eth0"}


def test_tap_that_cannot_be_created_leaves_nothing():
    with pod_network("tapbusy") as net:
        # Two pod interfaces; the second's tap name is taken (a veth called tap1_cocoon, its end
        # in the peer namespace): the first one's wiring must be undone.
        add_link(net.pod, ifname="eth1", kind="veth", peer={"ifname": "eth1-peer", "net_ns_fd": net.peer})
        add_link(net.pod, ifname="tap1_cocoon", kind="veth", peer={"ifname": "busy-peer", "net_ns_fd": net.peer})
        info = discover(net.pod_path)
        assert [i.name for i in info.interfaces] == ["eth0", "eth1"]  # tap*_cocoon is ours: skipped
        with pytest.raises(NetworkError, match="create tap") as err, wired(info, "tcfilter"):
            pass
        assert err.value.context["interface"] == "tap1_cocoon" and err.value.context["netns"] == net.pod_path
        assert "tap0_cocoon" not in links_of(net.pod)
        assert qdiscs_of(net.pod) == []


# -- the guest side's logic, run on the host in a namespace of its own (no VM) -------------------
def test_guest_network_configures_interface_routes_neighbours():
    with pod_network("guest", v4=False, v6=False) as net:
        mac = net.pod_mac()
        gn = GuestNetwork(run_in_netns(net.pod_path, Netlink))
        try:
            gn.loopback_up()
            want = NetInterface(name="net0", hw_addr=mac.upper(), mtu=1400,
                                addresses=(IPAddress("10.77.0.2", 24), IPAddress("fd77::2", 64)))
            got = gn.update_interface(want)
            assert got.name == "net0" and got.mtu == 1400 and got.hw_addr == mac
            assert {IPAddress("10.77.0.2", 24), IPAddress("fd77::2", 64)} <= set(got.addresses)
            # Again with one address less: exactly the wanted set stays (link-local aside).
            got = gn.update_interface(NetInterface(name="net0", hw_addr=mac, mtu=1400,
                                                   addresses=(IPAddress("fd77::2", 64),)))
            assert [a for a in got.addresses if not a.address.startswith("fe80")] == [IPAddress("fd77::2", 64)]
            gn.update_interface(want)
            routes = gn.update_routes([
                NetRoute("0.0.0.0/0", IPFamily.V4, gateway="10.77.0.1", device="net0"),
                NetRoute("::/0", IPFamily.V6, gateway="fd77::1", device="net0"),
                NetRoute("192.168.5.0/24", IPFamily.V4, device="net0"),
            ])
            dests = {(r.dest, r.gateway) for r in routes}
            assert {("0.0.0.0/0", "10.77.0.1"), ("::/0", "fd77::1"), ("192.168.5.0/24", "")} <= dests
            routes = gn.update_routes([NetRoute("0.0.0.0/0", IPFamily.V4, gateway="10.77.0.1", device="net0")])
            assert ("192.168.5.0/24", "") not in {(r.dest, r.gateway) for r in routes}
            gn.add_neighbors([NetNeighbor("10.77.0.50", "02:00:00:00:00:50", "net0")])
            assert "02:00:00:00:00:50" in net.in_pod(["ip", "neigh", "show", "10.77.0.50"]).stdout
            lo = next(i for i in gn.list_interfaces() if i.name == "lo")
            assert lo.flags & 1
            with pytest.raises(NotFound, match="MAC"):
                gn.update_interface(NetInterface(name="x", hw_addr="02:00:00:00:00:01", mtu=1500))
            with pytest.raises(InvalidArgument):
                gn.update_interface(NetInterface(name="net0", hw_addr=mac, mtu=1500,
                                                 addresses=(IPAddress("10.1.1.1", 40),)))
        finally:
            gn.close()


# -- the VMM refusing its tap (real QEMU, no guest needed) ----------------------------------------
async def test_qemu_that_cannot_use_the_tap_fd_fails_clearly(tmp_path, no_leaks):
    import shutil

    from cocoon.errors import BootError
    from cocoon.hypervisors.base import NetDevice, VMSpec
    from cocoon.hypervisors.qemu import QemuVM

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    for name in ("vmlinux", "initrd"):
        (tmp_path / name).write_bytes(b"x")
    not_a_tap = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    try:
        spec = VMSpec(sandbox_id="badtap", workdir=tmp_path, kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd",
                      nics=(NetDevice("net0", not_a_tap, "02:00:00:00:00:01"),))
        with pytest.raises(BootError) as err:
            async with QemuVM(spec):
                pass
    finally:
        os.close(not_a_tap)
    assert "net0" in str(err.value) or "TUNGETIFF" in str(err.value), str(err.value)
    assert not (tmp_path / "qmp.sock").exists()


# -- sandboxes wired to a pod namespace (real VMs) -------------------------------------------------
def _listener(net, family):
    import socket

    def make():
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        s.listen(1)
        s.settimeout(30)
        return s

    return run_in_netns(net.peer_path, make)


def _accept_one(sock):
    conn, _ = sock.accept()
    with conn:
        conn.settimeout(30)
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
        return data


def _send_from_peer(net, address, port, payload):
    import socket

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    s = run_in_netns(net.peer_path, lambda: socket.socket(family, socket.SOCK_STREAM))
    s.settimeout(30)
    with s:
        deadline = time.monotonic() + 30
        while True:
            try:
                s.connect((address, port))
                break
            except (ConnectionRefusedError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
                s.close()
                s = run_in_netns(net.peer_path, lambda: socket.socket(family, socket.SOCK_STREAM))
        s.sendall(payload)


async def _run(container, exec_id, args):
    caps = ["CAP_NET_RAW", "CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN"]
    proc = await container.exec(exec_id, {"args": args, "cwd": "/", "env": ["PATH=/bin"],
                                          "capabilities": {"bounding": caps, "effective": caps, "permitted": caps}})
    out, err, status = await proc.output()
    return out.decode(), err.decode(), status


def _net_bundle(directory):
    import json

    from cocoon.api.bundle import make_bundle
    from cocoon.oci.spec import load

    bundle = make_bundle(directory, ["sleep", "600"])
    raw = json.loads((bundle / "config.json").read_text())
    for key in ("bounding", "effective", "permitted"):
        raw["process"]["capabilities"][key] += ["CAP_NET_RAW", "CAP_NET_ADMIN"]
    (bundle / "config.json").write_text(json.dumps(raw))
    return load(bundle)


async def _check_traffic(net, container, address_pod, address_peer, tag):
    """ping and TCP both ways between the container and the peer namespace."""
    import asyncio
    import socket

    out, err, status = await _run(container, f"ping-{tag}", ["busybox", "ping", "-c", "2", "-W", "5", address_peer])
    assert status == 0, (out, err)
    family = socket.AF_INET6 if ":" in address_pod else socket.AF_INET
    lsock = _listener(net, family)
    with lsock:
        port = lsock.getsockname()[1]
        accepted = asyncio.ensure_future(asyncio.to_thread(_accept_one, lsock))
        out, err, status = await _run(container, f"nc-{tag}", ["sh", "-c", f"echo from-guest-{tag} | busybox nc "
                                                                             f"{address_peer} {port}"])
        assert status == 0, (out, err)
        assert await asyncio.wait_for(accepted, 30) == f"from-guest-{tag}\n".encode()
    ping = await asyncio.to_thread(net.in_peer, ["busybox", "ping", "-c", "2", "-W", "5", address_pod])
    assert ping.returncode == 0, ping.stdout + ping.stderr
    listen = await container.exec(f"listen-{tag}", {"args": ["busybox", "nc", "-l", "-p", "8080"], "cwd": "/",
                                                    "env": ["PATH=/bin"]})  # fmt: skip
    await listen.close_stdin()
    await asyncio.to_thread(_send_from_peer, net, address_pod, 8080, f"from-peer-{tag}\n".encode())
    out, _, status = await asyncio.wait_for(listen.output(), 30)
    assert out == f"from-peer-{tag}\n".encode() and status == 0


@pytest.mark.vm
@pytest.mark.parametrize(("model", "v4", "v6"), [
    ("tcfilter", True, True), ("macvtap", True, True), ("tcfilter", False, True), ("macvtap", True, False),
])  # fmt: skip
async def test_sandbox_on_a_pod_network(cfg, no_leaks, tmp_path, model, v4, v6):
    import dataclasses

    from cocoon.api.sandbox import Sandbox

    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, internetworking_model=model))
    tag = f"{model[:3]}{int(v4)}{int(v6)}"
    with pod_network(f"vm{tag}", v4=v4, v6=v6, mtu=1400) as net:
        spec = _net_bundle(tmp_path / "bundle")
        async with Sandbox(cfg, f"net-{tag}-{os.getpid()}", tmp_path / "sb", netns=net.pod_path) as sb:
            c = await sb.create_container("c", spec)
            await c.start()
            out, _, _ = await _run(c, "addr", ["busybox", "ip", "addr", "show", "eth0"])
            assert f"link/ether {net.pod_mac()}" in out and "mtu 1400" in out, out
            if v4:
                assert "inet 10.77.0.2/24" in out, out
                await _check_traffic(net, c, net.pod_v4, net.peer_v4, "v4")
            if v6:
                assert "inet6 fd77::2/64" in out, out
                await _check_traffic(net, c, net.pod_v6, net.peer_v6, "v6")
            routes, _, _ = await _run(c, "routes", ["sh", "-c", "busybox ip route; busybox ip -6 route"])
            if v4:
                assert "default via 10.77.0.1 dev eth0" in routes, routes
            if v6:
                assert "default via fd77::1 dev eth0" in routes, routes
        assert set(links_of(net.pod)) == {"lo", "eth0"}
        assert qdiscs_of(net.pod) == []


async def test_sandbox_refuses_a_pod_network_it_cannot_wire(cfg, no_leaks, tmp_path):
    from cocoon.api.sandbox import Sandbox, SandboxState

    with pod_network("sbbad") as net:
        add_link(net.pod, ifname="br0", kind="bridge")
        sb = Sandbox(cfg, f"netbad-{os.getpid()}", tmp_path / "sb", netns=net.pod_path)
        with pytest.raises(NetworkError, match="cannot wire a bridge") as err:
            await sb.start()
        assert err.value.context["sandbox"] == sb.id and err.value.context["interface"] == "br0"
        assert sb.state is SandboxState.STOPPED
        assert set(links_of(net.pod)) == {"lo", "eth0", "br0"} and qdiscs_of(net.pod) == []
        assert not (tmp_path / "sb" / "shared").exists()


async def test_sandbox_whose_vmm_fails_leaves_no_wiring(cfg, no_leaks, tmp_path):
    import dataclasses

    from cocoon.api.sandbox import Sandbox
    from cocoon.errors import HypervisorError

    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\necho 'qemu: cannot use the tap' >&2\nexit 1\n")
    fake.chmod(0o755)
    q = dataclasses.replace(cfg.hypervisor.qemu, path=str(fake), accel="tcg")
    bad = dataclasses.replace(cfg, hypervisor=dataclasses.replace(cfg.hypervisor, qemu=q))
    with pod_network("sbvmm") as net:
        sb = Sandbox(bad, f"netvmm-{os.getpid()}", tmp_path / "sb", netns=net.pod_path)
        with pytest.raises(HypervisorError, match="qemu exited"):
            await sb.start()
        assert set(links_of(net.pod)) == {"lo", "eth0"} and qdiscs_of(net.pod) == []
