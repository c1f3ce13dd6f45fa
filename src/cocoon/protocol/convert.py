"""Conversions between :mod:`cocoon.protocol.types` and the generated protobuf classes.

The only module outside the ttrpc layer that touches generated classes: ``*_to_pb``
builds a message (the guest agent answers with them), ``*_from_pb`` reads one (the host
turns answers into dataclasses).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from cocoon.protocol.gen.agent.v1 import agent_pb2
from cocoon.protocol.types import (
    ContainerStats,
    CpuStats,
    GuestDetails,
    GuestProcess,
    HealthStatus,
    IoDeviceStats,
    IPAddress,
    IPFamily,
    MemoryStats,
    NetInterface,
    NetNeighbor,
    NetRoute,
    NetworkStats,
    PidsStats,
    Storage,
    VersionInfo,
)

_HEALTH_FROM_PB = {
    agent_pb2.HealthCheckResponse.UNKNOWN: HealthStatus.UNKNOWN,
    agent_pb2.HealthCheckResponse.SERVING: HealthStatus.SERVING,
    agent_pb2.HealthCheckResponse.NOT_SERVING: HealthStatus.NOT_SERVING,
}
_HEALTH_TO_PB = {v: k for k, v in _HEALTH_FROM_PB.items()}


def health_from_pb(message: Any) -> HealthStatus:
    """HealthCheckResponse -> HealthStatus (an unknown enum value reads as UNKNOWN)."""
    return _HEALTH_FROM_PB.get(message.status, HealthStatus.UNKNOWN)


def health_to_pb(status: HealthStatus) -> Any:
    return agent_pb2.HealthCheckResponse(status=_HEALTH_TO_PB[status])


def version_from_pb(message: Any) -> VersionInfo:
    """VersionCheckResponse -> VersionInfo."""
    return VersionInfo(agent_version=str(message.agent_version), protocol_version=str(message.protocol_version))


def version_to_pb(info: VersionInfo) -> Any:
    return agent_pb2.VersionCheckResponse(agent_version=info.agent_version, protocol_version=info.protocol_version)


def guest_details_from_pb(message: Any) -> GuestDetails:
    """GuestDetailsResponse -> GuestDetails."""
    agent = message.agent_details
    return GuestDetails(
        kernel_release=str(message.kernel_release),
        kernel_version=str(message.kernel_version),
        memory_total_bytes=int(message.memory_total_bytes),
        cpu_count=int(message.cpu_count),
        agent_version=str(agent.version),
        capabilities=tuple(str(c) for c in agent.capabilities),
        init_daemon=bool(agent.init_daemon),
        mem_block_size_bytes=int(message.mem_block_size_bytes),
        supports_mem_hotplug_probe=bool(message.support_mem_hotplug_probe),
    )


def guest_details_to_pb(details: GuestDetails) -> Any:
    return agent_pb2.GuestDetailsResponse(
        kernel_release=details.kernel_release,
        kernel_version=details.kernel_version,
        memory_total_bytes=details.memory_total_bytes,
        cpu_count=details.cpu_count,
        mem_block_size_bytes=details.mem_block_size_bytes,
        support_mem_hotplug_probe=details.supports_mem_hotplug_probe,
        agent_details=agent_pb2.AgentDetails(
            version=details.agent_version,
            capabilities=list(details.capabilities),
            init_daemon=details.init_daemon,
        ),
    )


def datetime_to_pb(when: dt.datetime) -> Any:
    """An aware datetime -> SetGuestDateTimeRequest (seconds and microseconds since the Epoch).

    A naive datetime is taken as local time, as :meth:`datetime.timestamp` does.
    """
    seconds, micros = divmod(round(when.timestamp() * 1_000_000), 1_000_000)
    return agent_pb2.SetGuestDateTimeRequest(sec=seconds, usec=micros)


def datetime_from_pb(message: Any) -> dt.datetime:
    """SetGuestDateTimeRequest -> an aware UTC datetime."""
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return epoch + dt.timedelta(seconds=int(message.sec), microseconds=int(message.usec))


# ---- containers (appended with the container RPCs)


def storage_to_pb(storage: Storage) -> Any:
    """Storage -> agent_pb2.Storage."""
    return agent_pb2.Storage(
        driver=storage.driver,
        driver_options=list(storage.driver_options),
        source=storage.source,
        fstype=storage.fstype,
        options=list(storage.options),
        mount_point=storage.mount_point,
    )


def storage_from_pb(message: Any) -> Storage:
    """agent_pb2.Storage -> Storage."""
    return Storage(
        driver=str(message.driver),
        mount_point=str(message.mount_point),
        source=str(message.source),
        fstype=str(message.fstype),
        options=tuple(str(o) for o in message.options),
        driver_options=tuple(str(o) for o in message.driver_options),
    )


def stats_to_pb(stats: ContainerStats) -> Any:
    """ContainerStats -> StatsContainerResponse."""
    reply = agent_pb2.StatsContainerResponse()
    cg = reply.cgroup_stats
    c = stats.cpu
    cg.cpu.CopyFrom(agent_pb2.CpuStats(
        usage_usec=c.usage_usec, user_usec=c.user_usec, system_usec=c.system_usec,
        nr_periods=c.nr_periods, nr_throttled=c.nr_throttled, throttled_usec=c.throttled_usec,
    ))
    m = stats.memory
    cg.memory.CopyFrom(agent_pb2.MemoryStats(usage=m.usage, limit=m.limit, swap_usage=m.swap_usage,
                                             swap_limit=m.swap_limit))
    cg.memory.stat.update(m.stat)
    cg.pids.CopyFrom(agent_pb2.PidsStats(current=stats.pids.current, limit=stats.pids.limit))
    for d in stats.io:
        cg.io.add(major=d.major, minor=d.minor, rbytes=d.rbytes, wbytes=d.wbytes, rios=d.rios, wios=d.wios)
    for n in stats.network:
        reply.network_stats.add(
            name=n.name, rx_bytes=n.rx_bytes, rx_packets=n.rx_packets, rx_errors=n.rx_errors,
            rx_dropped=n.rx_dropped, tx_bytes=n.tx_bytes, tx_packets=n.tx_packets, tx_errors=n.tx_errors,
            tx_dropped=n.tx_dropped,
        )
    return reply


def processes_to_pb(processes: Iterable[GuestProcess]) -> Any:
    """GuestProcess dataclasses -> ListProcessesResponse."""
    return agent_pb2.ListProcessesResponse(processes=[
        agent_pb2.GuestProcess(pid=p.pid, ppid=p.ppid, uid=p.uid, state=p.state, command=p.command)
        for p in processes])  # fmt: skip


def processes_from_pb(message: Any) -> tuple[GuestProcess, ...]:
    """ListProcessesResponse -> GuestProcess dataclasses."""
    return tuple(GuestProcess(pid=int(p.pid), ppid=int(p.ppid), uid=int(p.uid), state=str(p.state),
                              command=str(p.command)) for p in message.processes)  # fmt: skip


def stats_from_pb(message: Any) -> ContainerStats:
    """StatsContainerResponse -> ContainerStats."""
    cg = message.cgroup_stats
    c, m, p = cg.cpu, cg.memory, cg.pids
    return ContainerStats(
        cpu=CpuStats(
            usage_usec=int(c.usage_usec), user_usec=int(c.user_usec), system_usec=int(c.system_usec),
            nr_periods=int(c.nr_periods), nr_throttled=int(c.nr_throttled), throttled_usec=int(c.throttled_usec),
        ),
        memory=MemoryStats(
            usage=int(m.usage), limit=int(m.limit), swap_usage=int(m.swap_usage), swap_limit=int(m.swap_limit),
            stat={str(k): int(v) for k, v in m.stat.items()},
        ),
        pids=PidsStats(current=int(p.current), limit=int(p.limit)),
        io=tuple(
            IoDeviceStats(major=int(d.major), minor=int(d.minor), rbytes=int(d.rbytes), wbytes=int(d.wbytes),
                          rios=int(d.rios), wios=int(d.wios))
            for d in cg.io
        ),
        network=tuple(
            NetworkStats(
                name=str(n.name), rx_bytes=int(n.rx_bytes), rx_packets=int(n.rx_packets),
                rx_errors=int(n.rx_errors), rx_dropped=int(n.rx_dropped), tx_bytes=int(n.tx_bytes),
                tx_packets=int(n.tx_packets), tx_errors=int(n.tx_errors), tx_dropped=int(n.tx_dropped),
            )
            for n in message.network_stats
        ),
    )



# ---- networking


def _family_to_pb(family: IPFamily) -> Any:
    return agent_pb2.V6 if family is IPFamily.V6 else agent_pb2.V4


def _family_from_pb(value: int) -> IPFamily:
    return IPFamily.V6 if value == agent_pb2.V6 else IPFamily.V4


def ip_address_to_pb(addr: IPAddress) -> Any:
    return agent_pb2.IPAddress(family=_family_to_pb(addr.family), address=addr.address, mask=str(addr.prefix_len))


def ip_address_from_pb(message: Any) -> IPAddress:
    """agent_pb2.IPAddress -> IPAddress; a mask that is not a decimal prefix length is InvalidArgument."""
    from cocoon.errors import InvalidArgument

    mask = str(message.mask)
    if not mask.isdigit() or int(mask) > (128 if ":" in message.address else 32):
        raise InvalidArgument("bad prefix length", field="mask", value=mask, address=str(message.address))
    return IPAddress(address=str(message.address), prefix_len=int(mask))


def interface_to_pb(iface: NetInterface) -> Any:
    """NetInterface -> agent_pb2.Interface."""
    return agent_pb2.Interface(
        device=iface.device, name=iface.name, hw_addr=iface.hw_addr, mtu=iface.mtu, type=iface.kind,
        raw_flags=iface.flags, ip_addresses=[ip_address_to_pb(a) for a in iface.addresses],
    )  # fmt: skip


def interface_from_pb(message: Any) -> NetInterface:
    """agent_pb2.Interface -> NetInterface."""
    return NetInterface(
        name=str(message.name), hw_addr=str(message.hw_addr).lower(), mtu=int(message.mtu),
        addresses=tuple(ip_address_from_pb(a) for a in message.ip_addresses), kind=str(message.type),
        device=str(message.device), flags=int(message.raw_flags),
    )  # fmt: skip


def route_to_pb(route: NetRoute) -> Any:
    """NetRoute -> agent_pb2.Route."""
    return agent_pb2.Route(dest=route.dest, gateway=route.gateway, device=route.device, source=route.source,
                           scope=route.scope, family=_family_to_pb(route.family))  # fmt: skip


def route_from_pb(message: Any) -> NetRoute:
    """agent_pb2.Route -> NetRoute."""
    return NetRoute(dest=str(message.dest), family=_family_from_pb(message.family), gateway=str(message.gateway),
                    device=str(message.device), source=str(message.source), scope=int(message.scope))  # fmt: skip


def neighbor_to_pb(neighbor: NetNeighbor) -> Any:
    """NetNeighbor -> agent_pb2.ARPNeighbor."""
    family = IPFamily.V6 if ":" in neighbor.ip else IPFamily.V4
    prefix = 128 if family is IPFamily.V6 else 32
    return agent_pb2.ARPNeighbor(
        to_ip_address=agent_pb2.IPAddress(family=_family_to_pb(family), address=neighbor.ip, mask=str(prefix)),
        device=neighbor.device, lladdr=neighbor.lladdr, state=neighbor.state, flags=neighbor.flags,
    )  # fmt: skip


def neighbor_from_pb(message: Any) -> NetNeighbor:
    """agent_pb2.ARPNeighbor -> NetNeighbor."""
    return NetNeighbor(ip=str(message.to_ip_address.address), lladdr=str(message.lladdr).lower(),
                       device=str(message.device), state=int(message.state), flags=int(message.flags))  # fmt: skip
