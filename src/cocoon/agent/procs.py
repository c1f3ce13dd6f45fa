"""What the guest kernel says about a process: /proc/<pid>/stat, status and cmdline."""

from __future__ import annotations

from cocoon.protocol.types import GuestProcess


def read_process(pid: int, proc: str = "/proc") -> GuestProcess | None:
    """The process ``pid``, or None if it is gone (it may exit while we read)."""
    try:
        with open(f"{proc}/{pid}/stat") as f:
            stat = f.read()
        with open(f"{proc}/{pid}/status") as f:
            status = f.read()
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; it ends at the last ")".
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    uid = 0
    for line in status.splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])  # the real uid
            break
    args = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    return GuestProcess(pid=pid, ppid=int(fields[1]), uid=uid, state=fields[0],
                        command=" ".join(args) if args else f"[{comm}]")  # fmt: skip


def read_processes(pids: list[int], proc: str = "/proc") -> list[GuestProcess]:
    """Those of ``pids`` still alive, in pid order."""
    found = (read_process(pid, proc) for pid in sorted(pids))
    return [p for p in found if p is not None]
