"""What the host and the agent say to each other, as frozen dataclasses.

The rest of Cocoon speaks these; :mod:`cocoon.protocol.convert` is the only module that
turns them into generated protobuf classes and back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

#: The agent API this code speaks (the protobuf package plus a revision).
PROTOCOL_VERSION = "cocoon.agent.v1.0"


class HealthStatus(enum.StrEnum):
    """Health.Check answer."""

    UNKNOWN = "unknown"
    SERVING = "serving"
    NOT_SERVING = "not-serving"


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """Health.Version: who answers, and in which dialect."""

    agent_version: str
    protocol_version: str


@dataclass(frozen=True, slots=True)
class GuestDetails:
    """AgentService.GetGuestDetails: what the guest is and what its agent can do."""

    kernel_release: str
    kernel_version: str
    memory_total_bytes: int
    cpu_count: int
    agent_version: str
    capabilities: tuple[str, ...] = ()
    init_daemon: bool = False
    mem_block_size_bytes: int = 0
    supports_mem_hotplug_probe: bool = False


# ---- containers (appended with the container RPCs)


@dataclass(frozen=True, slots=True)
class Storage:
    """Something the agent mounts in the guest before a container needs it (Kata's Storage).

    ``driver``: ``virtio-fs`` (``source`` is the share's tag), ``tmpfs``, ``local`` (a directory
    the agent creates). ``options`` are mount options (``ro``, ``nosuid``, ``size=64m``, ...).
    """

    driver: str
    mount_point: str
    source: str = ""
    fstype: str = ""
    options: tuple[str, ...] = ()
    driver_options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CpuStats:
    """cgroup v2 cpu.stat (microseconds and counts)."""

    usage_usec: int = 0
    user_usec: int = 0
    system_usec: int = 0
    nr_periods: int = 0
    nr_throttled: int = 0
    throttled_usec: int = 0


@dataclass(frozen=True, slots=True)
class MemoryStats:
    """memory.current/max, memory.swap.current/max and memory.stat; limits are 0 when unlimited."""

    usage: int = 0
    limit: int = 0
    swap_usage: int = 0
    swap_limit: int = 0
    stat: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PidsStats:
    """pids.current and pids.max (0 when unlimited)."""

    current: int = 0
    limit: int = 0


@dataclass(frozen=True, slots=True)
class IoDeviceStats:
    """One line of io.stat."""

    major: int
    minor: int
    rbytes: int = 0
    wbytes: int = 0
    rios: int = 0
    wios: int = 0


@dataclass(frozen=True, slots=True)
class NetworkStats:
    """Counters of one network interface."""

    name: str
    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0


@dataclass(frozen=True, slots=True)
class ContainerStats:
    """AgentService.StatsContainer: the container's cgroup v2 counters (and network, if any)."""

    cpu: CpuStats = field(default_factory=CpuStats)
    memory: MemoryStats = field(default_factory=MemoryStats)
    pids: PidsStats = field(default_factory=PidsStats)
    io: tuple[IoDeviceStats, ...] = ()
    network: tuple[NetworkStats, ...] = ()



@dataclass(frozen=True, slots=True)
class GuestProcess:
    """AgentService.ListProcesses: one process of a container, as the guest kernel sees it."""

    pid: int
    ppid: int = 0
    uid: int = 0
    state: str = ""
    command: str = ""


# ---- networking (the pod's interfaces as the host found them and the guest configures them)


class IPFamily(enum.IntEnum):
    """Address family of an address or a route."""

    V4 = 4
    V6 = 6


@dataclass(frozen=True, slots=True)
class IPAddress:
    """One address of an interface: ``10.88.0.5`` with prefix length 16."""

    address: str
    prefix_len: int

    @property
    def family(self) -> IPFamily:
        return IPFamily.V6 if ":" in self.address else IPFamily.V4

    def __str__(self) -> str:
        return f"{self.address}/{self.prefix_len}"


@dataclass(frozen=True, slots=True)
class NetInterface:
    """A network interface: the pod's (found by the host) or the guest's (configured by the agent).

    The guest finds its NIC by ``hw_addr`` (the VM's NIC has the pod interface's MAC) and gives
    it ``name``, ``mtu`` and exactly ``addresses`` (IPv6 link-local ones are the kernel's).
    ``kind`` is informational (``veth``, ``macvlan``, ``ipvlan`` on the host; empty in the guest).
    """

    name: str
    hw_addr: str
    mtu: int
    addresses: tuple[IPAddress, ...] = ()
    kind: str = ""
    device: str = ""  # the name it had when found in the guest (UpdateInterface may rename it)
    flags: int = 0  # IFF_* flags, as read


@dataclass(frozen=True, slots=True)
class NetRoute:
    """A route of the main table. ``dest`` is a network in CIDR form (``0.0.0.0/0``, ``::/0`` for default)."""

    dest: str
    family: IPFamily
    gateway: str = ""
    device: str = ""
    source: str = ""
    scope: int = 0  # RT_SCOPE_*: 0 universe, 253 link, 254 host

    @property
    def is_default(self) -> bool:
        return self.dest in ("0.0.0.0/0", "::/0")


#: NUD_PERMANENT: a static neighbour entry.
NUD_PERMANENT = 0x80


@dataclass(frozen=True, slots=True)
class NetNeighbor:
    """A static neighbour (ARP or NDP) entry: ``ip`` is at ``lladdr`` on ``device``."""

    ip: str
    lladdr: str
    device: str
    state: int = NUD_PERMANENT
    flags: int = 0
