"""The OCI runtime spec as frozen dataclasses: what a VM runtime honours of config.json.

Built by :mod:`cocoon.oci.spec`; names follow the spec's JSON fields in snake case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Root:
    path: Path  # absolute: a relative root.path is joined to the bundle and normalized
    readonly: bool = False


@dataclass(frozen=True)
class ConsoleSize:
    height: int
    width: int


@dataclass(frozen=True)
class User:
    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Capabilities:
    bounding: tuple[str, ...] = ()
    effective: tuple[str, ...] = ()
    inheritable: tuple[str, ...] = ()
    permitted: tuple[str, ...] = ()
    ambient: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rlimit:
    type: str
    hard: int
    soft: int


@dataclass(frozen=True)
class Process:
    """``process`` of config.json, or a process.json for exec."""

    args: tuple[str, ...]
    cwd: str
    terminal: bool = False
    console_size: ConsoleSize | None = None
    user: User = User()
    env: tuple[str, ...] = ()
    capabilities: Capabilities | None = None
    rlimits: tuple[Rlimit, ...] = ()
    no_new_privileges: bool = False
    oom_score_adj: int | None = None
    apparmor_profile: str = ""
    selinux_label: str = ""


@dataclass(frozen=True)
class Mount:
    destination: str
    type: str = ""
    source: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hook:
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None  # seconds


@dataclass(frozen=True)
class Hooks:
    prestart: tuple[Hook, ...] = ()
    create_runtime: tuple[Hook, ...] = ()
    create_container: tuple[Hook, ...] = ()
    start_container: tuple[Hook, ...] = ()
    poststart: tuple[Hook, ...] = ()
    poststop: tuple[Hook, ...] = ()


@dataclass(frozen=True)
class Namespace:
    type: str
    path: str = ""  # empty: a new namespace; else the namespace to join (e.g. a CNI netns)


@dataclass(frozen=True)
class IDMapping:
    container_id: int
    host_id: int
    size: int


@dataclass(frozen=True)
class Memory:
    limit: int | None = None
    reservation: int | None = None
    swap: int | None = None


@dataclass(frozen=True)
class Cpu:
    shares: int | None = None
    quota: int | None = None
    period: int | None = None
    cpus: str = ""
    mems: str = ""


@dataclass(frozen=True)
class DeviceRule:
    """A device cgroup rule (linux.resources.devices)."""

    allow: bool
    type: str = "a"
    major: int | None = None
    minor: int | None = None
    access: str = "rwm"


@dataclass(frozen=True)
class Resources:
    memory: Memory = Memory()
    cpu: Cpu = Cpu()
    pids_limit: int | None = None
    block_io_weight: int | None = None
    devices: tuple[DeviceRule, ...] = ()


@dataclass(frozen=True)
class Device:
    """A device node to create in the container (linux.devices)."""

    path: str
    type: str
    major: int = 0
    minor: int = 0
    file_mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class Linux:
    """The ``linux`` section; ``seccomp`` stays the raw object, applied inside the guest."""

    namespaces: tuple[Namespace, ...] = ()
    uid_mappings: tuple[IDMapping, ...] = ()
    gid_mappings: tuple[IDMapping, ...] = ()
    resources: Resources | None = None
    cgroups_path: str = ""
    devices: tuple[Device, ...] = ()
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()
    sysctl: Mapping[str, str] = field(default_factory=dict, hash=False)
    seccomp: Mapping[str, Any] | None = field(default=None, hash=False)  # as given: the guest applies it
    rootfs_propagation: str = ""

    def namespace(self, kind: str) -> Namespace | None:
        """The namespace entry of ``kind`` ("network", "pid", ...) or None if the spec has none."""
        return next((ns for ns in self.namespaces if ns.type == kind), None)

    @property
    def network_namespace(self) -> Namespace | None:
        """None: the host's network; a path: the netns CNI prepared (what networking reads)."""
        return self.namespace("network")


@dataclass(frozen=True)
class Spec:
    """A checked config.json. ``raw`` is the whole document as read (unknown fields included): the
    source of the guest's copy. Do not mutate it; ``copy.deepcopy`` it to adjust."""

    oci_version: str
    bundle: Path  # absolute
    path: Path  # the config.json read
    root: Root
    process: Process | None
    hostname: str = ""
    domainname: str = ""
    mounts: tuple[Mount, ...] = ()
    hooks: Hooks = Hooks()
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    linux: Linux | None = None
    sha256: str = ""  # of the file's bytes: lets state record which config a container was made from
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)
