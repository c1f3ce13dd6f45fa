"""`update` and `events`: resources in, statistics out, in runc's shapes.

``update`` turns runc's flags (or a LinuxResources JSON document) into OCI LinuxResources
that the guest applies to the container's cgroup. ``events`` prints runc's event JSON: a
``stats`` event built from the guest's cgroup v2 counters, and ``oom`` events.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from cocoon.api.container import _call, _client, load
from cocoon.api.state import ContainerState, Status
from cocoon.config import Config
from cocoon.errors import CocoonError, InvalidArgument

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30}


def parse_bytes(value: str, field: str) -> int:
    """``512m``, ``1g``, ``1048576`` or ``-1`` (unlimited) -> bytes."""
    text = value.strip().lower()
    if text == "-1":
        return -1
    number = text.rstrip("bkmg")
    unit = text[len(number) :]
    if not number.isdigit() or unit not in _UNITS:
        raise InvalidArgument(f"invalid size {value!r}", field=field)
    return int(number) * _UNITS[unit]


def resources_from_flags(
    *,
    resources_file: str | None = None,
    memory: str | None = None,
    memory_swap: str | None = None,
    memory_reservation: str | None = None,
    cpu_shares: int | None = None,
    cpu_quota: int | None = None,
    cpu_period: int | None = None,
    cpuset_cpus: str | None = None,
    cpuset_mems: str | None = None,
    pids_limit: int | None = None,
) -> dict[str, Any]:
    """OCI LinuxResources from runc update's flags (a ``-r`` file wins, ``-`` is stdin)."""
    if resources_file:
        try:
            text = sys.stdin.read() if resources_file == "-" else open(resources_file, encoding="utf-8").read()  # noqa: SIM115
            doc = json.loads(text)
        except OSError as exc:
            raise InvalidArgument(f"cannot read resources: {exc.strerror}", file=resources_file) from exc
        except ValueError as exc:
            raise InvalidArgument(f"invalid JSON in resources: {exc}", file=resources_file) from exc
        if not isinstance(doc, dict):
            raise InvalidArgument("resources must be a JSON object", file=resources_file)
        return doc
    res: dict[str, Any] = {}
    mem = {
        k: parse_bytes(v, f"--{k}")
        for k, v in (("limit", memory), ("swap", memory_swap), ("reservation", memory_reservation))
        if v is not None
    }
    if mem:
        res["memory"] = mem
    cpu: dict[str, Any] = {}
    for key, val in (("shares", cpu_shares), ("quota", cpu_quota), ("period", cpu_period)):
        if val is not None:
            if val < 0 and key != "quota":
                raise InvalidArgument(f"--cpu-{key} must not be negative", field=f"cpu-{key}")
            cpu[key] = val
    if cpuset_cpus:
        cpu["cpus"] = cpuset_cpus
    if cpuset_mems:
        cpu["mems"] = cpuset_mems
    if cpu:
        res["cpu"] = cpu
    if pids_limit is not None:
        res["pids"] = {"limit": pids_limit}
    if not res:
        raise InvalidArgument("nothing to update: give a resource flag or --resources", field="resources")
    return res


def update(cfg: Config, container_id: str, resources: dict[str, Any]) -> None:
    state = load(cfg, container_id)
    state.status.require("kill", id=container_id)  # a live container: created, running or paused
    _call(state, "update_container", container_id, resources)


def stats_event(container_id: str, stats: Any) -> dict[str, Any]:
    """runc's ``{"type":"stats"}`` event from the guest's cgroup v2 counters (ns for CPU, like runc)."""
    cpu, mem, pids = stats.cpu, stats.memory, stats.pids
    return {
        "type": "stats",
        "id": container_id,
        "data": {
            "cpu": {
                "usage": {"total": cpu.usage_usec * 1000, "kernel": cpu.system_usec * 1000,
                          "user": cpu.user_usec * 1000, "percpu": []},
                "throttling": {"periods": cpu.nr_periods, "throttledPeriods": cpu.nr_throttled,
                               "throttledTime": cpu.throttled_usec * 1000},
            },
            "memory": {
                "usage": {"usage": mem.usage, "limit": mem.limit},
                "swap": {"usage": mem.swap_usage, "limit": mem.swap_limit},
                "raw": dict(mem.stat),
            },
            "pids": {"current": pids.current, "limit": pids.limit},
            "blkio": {"ioServiceBytesRecursive": [
                {"major": d.major, "minor": d.minor, "op": op, "value": value}
                for d in stats.io for op, value in (("Read", d.rbytes), ("Write", d.wbytes))
            ]},
        },
    }  # fmt: skip


def oom_event(container_id: str) -> dict[str, Any]:
    """runc's event for a container whose cgroup hit its memory limit and had a process killed."""
    return {"type": "oom", "id": container_id}


def events(cfg: Config, container_id: str, *, stats_once: bool, interval: float, out: Any = None) -> None:
    """Print runc's events: one ``stats`` event with ``stats_once``; else a ``stats`` event every
    ``interval`` and an ``oom`` event for each OOM kill in the container, until the container stops."""
    import asyncio

    out = out or sys.stdout
    state = load(cfg, container_id)
    state.status.require("kill", id=container_id)  # a live container: created, running or paused
    if stats_once:
        _emit(out, stats_event(container_id, _call(state, "stats_container", container_id)))
        return
    asyncio.run(_stream(cfg, state, interval, out))


def _emit(out: Any, event: dict[str, Any]) -> None:
    out.write(json.dumps(event) + "\n")
    out.flush()


async def _stream(cfg: Config, state: ContainerState, interval: float, out: Any) -> None:
    import asyncio

    cid = state.id
    client = await _client(state)
    oom: asyncio.Future[str] = asyncio.ensure_future(client.get_oom_event())
    try:
        await asyncio.sleep(0)  # the OOM request goes out first: printed stats mean we are listening
        while True:
            try:
                _emit(out, stats_event(cid, await client.stats_container(cid)))
            except CocoonError:
                if _stopped(cfg, cid):
                    return
                raise
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                await asyncio.wait({oom}, timeout=left)
                if not oom.done():
                    break
                try:
                    _emit(out, oom_event(oom.result()))
                except CocoonError:  # the monitor ends the wait when the container stops
                    if _stopped(cfg, cid):
                        return
                    raise
                oom = asyncio.ensure_future(client.get_oom_event())
    finally:
        if oom.done() and not oom.cancelled():
            oom.exception()  # retrieved: a failed call after the end is expected
        oom.cancel()
        await client.close()


def _stopped(cfg: Config, container_id: str) -> bool:
    try:
        return load(cfg, container_id).status == Status.STOPPED
    except CocoonError:  # deleted meanwhile
        return True
