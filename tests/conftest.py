"""Shared fixtures: every test that may start processes asserts it leaked none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _is_cocoon(argv: list[bytes]) -> bool:
    # A monitor or an exec stand-in keeps the command line of the `cocoon create`/`exec` that forked it.
    return any(a.endswith(b"/cocoon") or a == b"cocoon" or a == b"cocoon.cli.main" for a in argv[:3])


def _our_processes(marker: str = "") -> set[int]:
    """PIDs of qemu/virtiofsd/cocoon (monitor, exec stand-in) processes whose command line names ``marker``
    (this run's temp dir)."""
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
        if ("qemu-system" in cmd or "virtiofsd" in cmd or _is_cocoon(argv)) and marker.encode() in b" ".join(argv):
            found.add(int(entry.name))
    found.discard(me)
    return found


@pytest.fixture
def no_leaks(tmp_path_factory):
    """Fails the test if it leaves a qemu, virtiofsd or cocoon monitor/stand-in process behind (only this
    run's are counted: their sockets and state live under this run's temp dir)."""
    import time

    marker = str(tmp_path_factory.getbasetemp())
    before = _our_processes(marker)
    yield
    # A monitor winds down (VM poweroff, virtiofsd, unmounts) right after its last client returned.
    deadline = time.monotonic() + 15
    while (left := _our_processes(marker) - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"leaked processes: {sorted(left)}"
    # A template clone's RAM copy is unlinked as soon as its QEMU holds it: one whose owner is gone leaked.
    from cocoon.api.factory import _alive, _owner_pid
    from cocoon.config import FactoryConfig

    templates = Path(FactoryConfig().template_dir)
    copies = [p.name for p in templates.glob("clone-*.ram")] if templates.is_dir() else []
    leaked = [name for name in copies if (pid := _owner_pid(name)) is not None and not _alive(pid)]
    assert not leaked, f"leaked template RAM copies: {leaked}"
