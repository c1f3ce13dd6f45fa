"""Pure parts of pod networking: wire conversions, netlink packing, discovery filters, config."""

from __future__ import annotations

import socket

import pytest

from cocoon import config
from cocoon.agent import netlink as nl
from cocoon.agent.network import check_address, is_link_local, route_order
from cocoon.errors import ConfigError, InvalidArgument, NetworkError
from cocoon.network.discover import interfaces_from, keep_address, neighbors_from, routes_from
from cocoon.protocol import convert
from cocoon.protocol.types import IPAddress, IPFamily, NetInterface, NetNeighbor, NetRoute


class Msg(dict):
    """The slice of pyroute2's message interface discovery uses (item access, get, get_nested)."""

    def __init__(self, fields, attrs=None, kind=None):
        super().__init__(fields)
        self.attrs = attrs or {}
        self.kind = kind

    def get(self, key, default=None):
        return self.attrs.get(key, super().get(key, default))

    def get_nested(self, *path):
        return self.kind


def test_interface_route_neighbor_round_trip():
    iface = NetInterface(name="eth0", hw_addr="02:aa:bb:cc:dd:ee", mtu=1400, kind="veth",
                         addresses=(IPAddress("10.0.0.2", 24), IPAddress("fd00::2", 64)))
    assert convert.interface_from_pb(convert.interface_to_pb(iface)) == iface
    assert convert.interface_to_pb(iface).ip_addresses[1].family == 1  # proto V6
    for route in (NetRoute("0.0.0.0/0", IPFamily.V4, gateway="10.0.0.1", device="eth0"),
                  NetRoute("::/0", IPFamily.V6, gateway="fd00::1", device="eth0", scope=0)):
        assert convert.route_from_pb(convert.route_to_pb(route)) == route
    n = NetNeighbor("fd00::9", "02:00:00:00:00:09", "eth0")
    assert convert.neighbor_from_pb(convert.neighbor_to_pb(n)) == n
    bad = convert.ip_address_to_pb(IPAddress("10.0.0.2", 24))
    bad.mask = "255.255.255.0"
    with pytest.raises(InvalidArgument, match="prefix length"):
        convert.ip_address_from_pb(bad)


def test_netlink_attrs_pack_and_parse():
    packed = nl.attr(nl.IFLA_IFNAME, b"eth0\0") + nl.attr(nl.IFLA_MTU, (1400).to_bytes(4, "little"))
    assert len(packed) % 4 == 0
    attrs = nl.parse_attrs(packed)
    assert nl.cstr(attrs[nl.IFLA_IFNAME]) == "eth0" and int.from_bytes(attrs[nl.IFLA_MTU], "little") == 1400
    assert nl.mac_str(nl.mac_bytes("02:AA:bb:00:01:ff")) == "02:aa:bb:00:01:ff"
    assert nl.family_of("fd00::1") == socket.AF_INET6 and nl.family_of("10.0.0.1") == socket.AF_INET
    with pytest.raises(ValueError):
        nl.mac_bytes("02:aa")


def test_guest_side_checks_and_route_order():
    assert check_address(IPAddress("FD00::0002", 64), "eth0") == IPAddress("fd00::2", 64)
    with pytest.raises(InvalidArgument, match="prefix"):
        check_address(IPAddress("10.0.0.1", 33), "eth0")
    with pytest.raises(InvalidArgument, match="bad IP"):
        check_address(IPAddress("10.0.0", 8), "eth0")
    assert is_link_local("fe80::1") and not is_link_local("fd00::1")
    routes = [NetRoute("0.0.0.0/0", IPFamily.V4, gateway="10.0.0.1"), NetRoute("10.9.0.0/16", IPFamily.V4)]
    assert [r.dest for r in route_order(routes)] == ["10.9.0.0/16", "0.0.0.0/0"]


def test_discovery_filters():
    assert not keep_address("fe80::1") and keep_address("fd00::1") and keep_address("10.0.0.1")
    links = [Msg({"index": 1, "flags": 0x8}, {"IFLA_IFNAME": "lo"}),
             Msg({"index": 2, "flags": 0x1}, {"IFLA_IFNAME": "eth0", "IFLA_ADDRESS": "02:AA:00:00:00:01",
                                               "IFLA_MTU": 1450}, kind="veth"),
             Msg({"index": 3, "flags": 0x1}, {"IFLA_IFNAME": "tap0_cocoon"}, kind="tun")]
    addrs = [Msg({"index": 2, "prefixlen": 24}, {"IFA_ADDRESS": "10.0.0.2"}),
             Msg({"index": 2, "prefixlen": 64}, {"IFA_ADDRESS": "fe80::1"})]
    found = interfaces_from(links, addrs, "/run/netns/x")
    assert found == [(2, NetInterface("eth0", "02:aa:00:00:00:01", 1450, (IPAddress("10.0.0.2", 24),), "veth"))]
    with pytest.raises(NetworkError, match="cannot wire a vxlan") as err:
        interfaces_from([Msg({"index": 4, "flags": 0}, {"IFLA_IFNAME": "vx0"}, kind="vxlan")], [], "/n")
    assert err.value.context == {"netns": "/n", "interface": "vx0", "kind": "vxlan"}
    base = {"table": 254, "type": 1, "proto": 3, "scope": 0, "dst_len": 0, "family": socket.AF_INET}
    routes = [Msg(base, {"RTA_GATEWAY": "10.0.0.1", "RTA_OIF": 2}),
              Msg({**base, "proto": 2, "dst_len": 24}, {"RTA_DST": "10.0.0.0", "RTA_OIF": 2}),  # kernel's
              Msg({**base, "table": 255, "type": 2}, {"RTA_DST": "10.0.0.2", "RTA_OIF": 2}),  # local table
              Msg({**base, "family": socket.AF_INET6}, {"RTA_GATEWAY": "fd00::1", "RTA_OIF": 2}),
              Msg(base, {"RTA_GATEWAY": "10.1.0.1", "RTA_OIF": 9})]  # not a wired interface
    assert routes_from(routes, {2: "eth0"}) == [
        NetRoute("0.0.0.0/0", IPFamily.V4, gateway="10.0.0.1", device="eth0"),
        NetRoute("::/0", IPFamily.V6, gateway="fd00::1", device="eth0"),
    ]
    neigh = [Msg({"ifindex": 2, "state": 0x80}, {"NDA_DST": "10.0.0.9", "NDA_LLADDR": "02:00:00:00:00:09"}),
             Msg({"ifindex": 2, "state": 0x02}, {"NDA_DST": "10.0.0.8", "NDA_LLADDR": "02:00:00:00:00:08"})]
    assert neighbors_from(neigh, {2: "eth0"}) == [NetNeighbor("10.0.0.9", "02:00:00:00:00:09", "eth0")]


def test_network_model_config_key():
    assert config.parse("").runtime.internetworking_model == "tcfilter"
    assert config.parse('[runtime]\ninternetworking_model = "macvtap"').runtime.internetworking_model == "macvtap"
    with pytest.raises(ConfigError, match=r"runtime\.internetworking_model"):
        config.parse('[runtime]\ninternetworking_model = "bridge"')
