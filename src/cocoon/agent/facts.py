"""Facts about the guest the agent reports (GetGuestDetails). Standard library only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GuestFacts:
    kernel_release: str
    kernel_version: str
    memory_total_kib: int
    cpus: int
    hostname: str


def meminfo_total_kib(text: str) -> int:
    """MemTotal from /proc/meminfo text, in KiB (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def cmdline_params(text: str) -> dict[str, str]:
    """``key=value`` (and bare ``flag``) words of /proc/cmdline."""
    params: dict[str, str] = {}
    for word in text.split():
        key, _, value = word.partition("=")
        params[key] = value
    return params


def collect(proc: Path = Path("/proc")) -> GuestFacts:
    uts = os.uname()
    try:
        mem = meminfo_total_kib((proc / "meminfo").read_text())
    except OSError:
        mem = 0
    return GuestFacts(
        kernel_release=uts.release,
        kernel_version=uts.version,
        memory_total_kib=mem,
        cpus=os.cpu_count() or 1,
        hostname=uts.nodename,
    )


def find_virtio_port(name: str, sys_class: Path = Path("/sys/class/virtio-ports")) -> Path | None:
    """The /dev node of the virtio-serial port the host named ``name`` (e.g. cocoon.agent)."""
    try:
        entries = sorted(sys_class.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            if (entry / "name").read_text().strip() == name:
                return Path("/dev") / entry.name
        except OSError:
            continue
    return None
