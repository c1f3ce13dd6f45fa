"""Shared fixtures: every test that may start processes asserts it leaked none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _our_processes(marker: str = "") -> set[int]:
    """PIDs of qemu/virtiofsd processes whose command line names ``marker`` (this run's temp dir)."""
    me = os.getpid()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        cmd = argv[0].decode(errors="replace")
        if ("qemu-system" in cmd or "virtiofsd" in cmd) and marker.encode() in b" ".join(argv):
            found.add(int(entry.name))
    found.discard(me)
    return found


@pytest.fixture
def no_leaks(tmp_path_factory):
    """Fails the test if it leaves a qemu or virtiofsd process behind (only this run's are counted:
    their sockets live under this run's temp dir)."""
    marker = str(tmp_path_factory.getbasetemp())
    before = _our_processes(marker)
    yield
    left = _our_processes(marker) - before
    assert not left, f"leaked VMM processes: {sorted(left)}"
