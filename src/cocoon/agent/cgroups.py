"""A container's cgroup v2 directory in the guest: statistics, processes, OOM kills.

crun puts a container in ``/sys/fs/cgroup/cocoon/<id>`` (the agent sets ``linux.cgroupsPath``
to ``/cocoon/<id>``). The parsers are pure functions of the files' text, tested on the host;
:func:`read_stats` reads the files (a missing file, a controller that is not enabled, reads
as zeros rather than failing the whole answer).
"""

from __future__ import annotations

import os

from cocoon.protocol.types import ContainerStats, CpuStats, IoDeviceStats, MemoryStats, PidsStats

CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_PARENT = "cocoon"


def cgroups_path(container_id: str) -> str:
    """The ``linux.cgroupsPath`` the guest gives a container (relative to the cgroup2 root)."""
    return f"/{CGROUP_PARENT}/{container_id}"


def cgroup_dir(container_id: str, root: str = CGROUP_ROOT) -> str:
    return f"{root}{cgroups_path(container_id)}"


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.stat, memory.events) -> {key: value}; junk skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def parse_limit(text: str) -> int:
    """A single value file (memory.max, pids.max, memory.current): ``max`` reads as 0 (unlimited)."""
    value = text.strip()
    if not value or value == "max":
        return 0
    try:
        return int(value)
    except ValueError:
        return 0


def parse_io_stat(text: str) -> tuple[IoDeviceStats, ...]:
    """io.stat lines ``MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. dbytes=.. dios=..``."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if not parts or ":" not in parts[0]:
            continue
        major, _, minor = parts[0].partition(":")
        fields: dict[str, int] = {}
        for item in parts[1:]:
            key, sep, value = item.partition("=")
            if sep and value.isdigit():
                fields[key] = int(value)
        try:
            dev = IoDeviceStats(major=int(major), minor=int(minor), rbytes=fields.get("rbytes", 0),
                                wbytes=fields.get("wbytes", 0), rios=fields.get("rios", 0),
                                wios=fields.get("wios", 0))
        except ValueError:
            continue
        out.append(dev)
    return tuple(out)


def cpu_stats(text: str) -> CpuStats:
    s = parse_flat_keyed(text)
    return CpuStats(
        usage_usec=s.get("usage_usec", 0), user_usec=s.get("user_usec", 0), system_usec=s.get("system_usec", 0),
        nr_periods=s.get("nr_periods", 0), nr_throttled=s.get("nr_throttled", 0),
        throttled_usec=s.get("throttled_usec", 0),
    )


def stats_from_files(files: dict[str, str]) -> ContainerStats:
    """ContainerStats from {file name: contents} of a cgroup directory (absent files are zeros)."""
    get = files.get
    return ContainerStats(
        cpu=cpu_stats(get("cpu.stat", "")),
        memory=MemoryStats(
            usage=parse_limit(get("memory.current", "")),
            limit=parse_limit(get("memory.max", "")),
            swap_usage=parse_limit(get("memory.swap.current", "")),
            swap_limit=parse_limit(get("memory.swap.max", "")),
            stat=parse_flat_keyed(get("memory.stat", "")),
        ),
        pids=PidsStats(current=parse_limit(get("pids.current", "")), limit=parse_limit(get("pids.max", ""))),
        io=parse_io_stat(get("io.stat", "")),
    )


STAT_FILES = ("cpu.stat", "memory.current", "memory.max", "memory.swap.current", "memory.swap.max",
              "memory.stat", "pids.current", "pids.max", "io.stat")


def read_files(directory: str, names: tuple[str, ...] = STAT_FILES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            with open(os.path.join(directory, name)) as f:
                out[name] = f.read()
        except OSError:
            continue
    return out


def read_stats(directory: str) -> ContainerStats:
    """The statistics of the cgroup at ``directory``."""
    return stats_from_files(read_files(directory))


def read_pids(directory: str) -> list[int]:
    """PIDs (in the agent's pid namespace) of every process in the cgroup and its children."""
    pids: list[int] = []
    for dirpath, _dirs, files in os.walk(directory):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.extend(int(line) for line in f.read().split())
        except (OSError, ValueError):
            continue
    return sorted(set(pids))


def oom_kills(directory: str) -> int:
    """The ``oom_kill`` counter of memory.events (0 when unreadable)."""
    try:
        with open(os.path.join(directory, "memory.events")) as f:
            return parse_flat_keyed(f.read()).get("oom_kill", 0)
    except OSError:
        return 0
