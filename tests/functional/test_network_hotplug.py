"""Network hot-plug on a real VM: a sandbox starts with one veth in its pod namespace, a second
veth is added to the namespace while it runs and given to the guest (Sandbox.add_interface),
carries ping and TCP both ways over IPv4 and IPv6, and is taken back (Sandbox.remove_interface).
Failures on the way (no such interface, a tap name taken, no free hot-plug slot) leave nothing.

Namespaces come from tests/functional/netns_helpers.py; no traffic leaves them.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
from netns_helpers import PodNet, _off_loop, add_link, links_of, pod_network, qdiscs_of
from pyroute2 import IPRoute
from test_network import _check_traffic, _net_bundle, _run

from cocoon.errors import HypervisorError, InvalidArgument, NetworkError, NotFound

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@_off_loop
def _second_veth(net: PodNet, pod_if: str, peer_if: str, subnet: int) -> PodNet:
    """What a CNI plugin adding a second network does: a veth into the pod namespace with
    addresses (10.<subnet>.0.2/24, fd<subnet>::2/64) and a route to 192.168.<subnet>.0/24 through
    it; the other end, .1, in the peer namespace."""
    with IPRoute(netns=net.peer, flags=0) as peer:
        peer.link("add", ifname=peer_if, kind="veth", peer={"ifname": pod_if, "net_ns_fd": net.pod})
        idx = peer.link_lookup(ifname=peer_if)[0]
        peer.link("set", index=idx, state="up")
        peer.addr("add", index=idx, address=f"10.{subnet}.0.1", prefixlen=24)
        peer.addr("add", index=idx, address=f"fd{subnet}::1", prefixlen=64, flags=0x02)  # IFA_F_NODAD
    with IPRoute(netns=net.pod, flags=0) as pod:
        idx = pod.link_lookup(ifname=pod_if)[0]
        pod.link("set", index=idx, state="up")
        pod.addr("add", index=idx, address=f"10.{subnet}.0.2", prefixlen=24)
        pod.addr("add", index=idx, address=f"fd{subnet}::2", prefixlen=64, flags=0x02)
        pod.route("add", dst=f"192.168.{subnet}.0/24", gateway=f"10.{subnet}.0.1")
    return dataclasses.replace(net, pod_if=pod_if, peer_if=peer_if, pod_v4=f"10.{subnet}.0.2",
                               peer_v4=f"10.{subnet}.0.1", pod_v6=f"fd{subnet}::2", peer_v6=f"fd{subnet}::1")


def _ours(ns: str) -> tuple[set[str], list[tuple[str, str]]]:
    """Our taps/macvtaps and every non-default qdisc in the namespace."""
    return {n for n in links_of(ns) if n.endswith("_cocoon")}, sorted(qdiscs_of(ns))


@pytest.mark.vm
async def test_interface_added_and_removed_while_the_pod_runs(cfg, no_leaks, tmp_path):
    from cocoon.api.sandbox import Sandbox

    # One hot-plug slot: a second interface added at once finds none free. (Cold boot: a template's
    # clone has more ports, docs/factory.md.)
    q = dataclasses.replace(cfg.hypervisor.qemu, hotplug_slots=1)
    cfg = dataclasses.replace(cfg, hypervisor=dataclasses.replace(cfg.hypervisor, qemu=q),
                              factory=dataclasses.replace(cfg.factory, template=False))  # fmt: skip
    with pod_network("hotplug") as net:
        spec = _net_bundle(tmp_path / "bundle")
        async with Sandbox(cfg, f"hotplug-{os.getpid()}", tmp_path / "sb", netns=net.pod_path) as sb:
            c = await sb.create_container("c", spec)
            await c.start()
            assert sb.interfaces == ("eth0",)
            boot_wiring = _ours(net.pod)
            assert boot_wiring[0] == {"tap0_cocoon"}

            # Nothing of that name in the namespace: a clear error, nothing made.
            with pytest.raises(NotFound, match="no such interface") as err:
                await sb.add_interface("nope0")
            assert err.value.context["interface"] == "nope0" and err.value.context["netns"] == net.pod_path
            assert err.value.context["sandbox"] == sb.id
            assert _ours(net.pod) == boot_wiring and sb.interfaces == ("eth0",)

            second = _second_veth(net, "eth1", "veth-peer1", 78)
            # The tap name the wiring wants is taken: the error names it, nothing is left.
            add_link(net.pod, ifname="tap1_cocoon", kind="veth", peer={"ifname": "busy-peer", "net_ns_fd": net.peer})
            with pytest.raises(NetworkError, match="create tap") as nerr:
                await sb.add_interface("eth1")
            assert nerr.value.context["interface"] == "tap1_cocoon"
            assert _ours(net.pod) == ({"tap0_cocoon", "tap1_cocoon"}, boot_wiring[1])
            _off_loop(_del_link)(net.pod, "tap1_cocoon")

            got = await sb.add_interface("eth1")
            assert got.name == "eth1" and got.hw_addr == _mac(net.pod, "eth1")
            assert sb.interfaces == ("eth0", "eth1")
            taps, qdiscs = _ours(net.pod)
            assert taps == {"tap0_cocoon", "tap1_cocoon"}
            assert {("eth1", "ingress"), ("tap1_cocoon", "ingress")} <= set(qdiscs)
            out, _, _ = await _run(c, "addr1", ["busybox", "ip", "addr", "show", "eth1"])
            assert "inet 10.78.0.2/24" in out and "inet6 fd78::2/64" in out, out
            routes, _, _ = await _run(c, "routes1", ["busybox", "ip", "route"])
            # The first interface's routes survive the re-sync; the new one's are there.
            assert "default via 10.77.0.1 dev eth0" in routes and "192.168.78.0/24 via 10.78.0.1 dev eth1" in routes
            await _check_traffic(second, c, second.pod_v4, second.peer_v4, "hp4")
            await _check_traffic(second, c, second.pod_v6, second.peer_v6, "hp6")
            await _check_traffic(net, c, net.pod_v4, net.peer_v4, "boot4")

            # No free slot for a third: its wiring is undone.
            _second_veth(net, "eth2", "veth-peer2", 79)
            with pytest.raises(HypervisorError, match="no free hot-plug slot") as herr:
                await sb.add_interface("eth2")
            assert herr.value.context["interface"] == "eth2"
            assert _ours(net.pod) == (taps, qdiscs) and sb.interfaces == ("eth0", "eth1")

            with pytest.raises(InvalidArgument, match="only interfaces added while"):
                await sb.remove_interface("eth0")
            await sb.remove_interface("eth1")
            assert sb.interfaces == ("eth0",)
            links, _, _ = await _run(c, "links", ["busybox", "ip", "-o", "link"])
            assert "eth1" not in links and got.hw_addr not in links, links
            assert _ours(net.pod) == boot_wiring
            with pytest.raises(NotFound, match="no hot-plugged interface"):
                await sb.remove_interface("eth1")
            await _check_traffic(net, c, net.pod_v4, net.peer_v4, "after")
        assert _ours(net.pod) == (set(), [])
        assert set(links_of(net.pod)) == {"lo", "eth0", "eth1", "eth2"}


@pytest.mark.vm
async def test_interfaces_still_plugged_are_unwired_at_stop(cfg, no_leaks, tmp_path):
    from cocoon.api.sandbox import Sandbox

    q = dataclasses.replace(cfg.hypervisor.qemu, hotplug_slots=2)
    cfg = dataclasses.replace(cfg, hypervisor=dataclasses.replace(cfg.hypervisor, qemu=q),
                              runtime=dataclasses.replace(cfg.runtime, internetworking_model="macvtap"))
    with pod_network("hpstop", v6=False) as net:
        async with Sandbox(cfg, f"hpstop-{os.getpid()}", tmp_path / "sb", netns=net.pod_path) as sb:
            _second_veth(net, "eth1", "veth-peer1", 78)
            got = await sb.add_interface("eth1")
            assert got.name == "eth1" and "10.78.0.2" in {a.address for a in got.addresses}
            assert _ours(net.pod)[0] == {"mtap0_cocoon", "mtap1_cocoon"}
            ping = net.in_peer(["busybox", "ping", "-c", "2", "-W", "5", "10.78.0.2"])
            assert ping.returncode == 0, ping.stdout + ping.stderr
        assert _ours(net.pod) == (set(), [])


def _mac(ns: str, name: str) -> str:
    @_off_loop
    def read() -> str:
        with IPRoute(netns=ns, flags=0) as ipr:
            return str(ipr.get_links(ipr.link_lookup(ifname=name)[0])[0].get("IFLA_ADDRESS"))

    return read()


def _del_link(ns: str, name: str) -> None:
    with IPRoute(netns=ns, flags=0) as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname=name)[0])

