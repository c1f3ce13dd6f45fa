"""Shared fixtures: every test that may start processes asserts it leaked none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _our_processes() -> set[int]:
    """PIDs of qemu/virtiofsd processes that descend from this test run."""
    me = os.getpid()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd or "virtiofsd" in cmd:
            found.add(int(entry.name))
    found.discard(me)
    return found


@pytest.fixture
def no_leaks():
    """Fails the test if it leaves a qemu or virtiofsd process behind."""
    before = _our_processes()
    yield
    left = _our_processes() - before
    assert not left, f"leaked VMM processes: {sorted(left)}"
