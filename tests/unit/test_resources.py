from __future__ import annotations

import json

import pytest

from cocoon.api.resources import parse_bytes, resources_from_flags, stats_event
from cocoon.errors import InvalidArgument
from cocoon.protocol.types import ContainerStats, CpuStats, IoDeviceStats, MemoryStats, PidsStats


@pytest.mark.parametrize(("text", "value"), [("512m", 512 << 20), ("1g", 1 << 30), ("100", 100), ("-1", -1),
                                             ("4KB", 4096)])  # fmt: skip
def test_parse_bytes(text, value):
    assert parse_bytes(text, "memory") == value


@pytest.mark.parametrize("text", ["", "lots", "5t", "1.5g", "m"])
def test_parse_bytes_refuses(text):
    with pytest.raises(InvalidArgument, match="invalid size") as info:
        parse_bytes(text, "--memory")
    assert info.value.field == "--memory"


def test_flags_to_linux_resources():
    res = resources_from_flags(memory="64m", cpu_quota=50000, cpu_period=100000, cpuset_cpus="0", pids_limit=20)
    assert res == {"memory": {"limit": 64 << 20}, "cpu": {"quota": 50000, "period": 100000, "cpus": "0"},
                   "pids": {"limit": 20}}  # fmt: skip
    with pytest.raises(InvalidArgument, match="nothing to update"):
        resources_from_flags()
    with pytest.raises(InvalidArgument, match="cpu-shares"):
        resources_from_flags(cpu_shares=-5)


def test_resources_file(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"pids": {"limit": 3}}))
    assert resources_from_flags(resources_file=str(f)) == {"pids": {"limit": 3}}
    f.write_text("[1]")
    with pytest.raises(InvalidArgument, match="JSON object"):
        resources_from_flags(resources_file=str(f))
    f.write_text("{")
    with pytest.raises(InvalidArgument, match="invalid JSON"):
        resources_from_flags(resources_file=str(f))
    with pytest.raises(InvalidArgument, match="cannot read"):
        resources_from_flags(resources_file=str(tmp_path / "none.json"))


def test_stats_event_has_runc_shape():
    stats = ContainerStats(
        cpu=CpuStats(usage_usec=10, user_usec=6, system_usec=4),
        memory=MemoryStats(usage=1000, limit=4096, stat={"anon": 5}),
        pids=PidsStats(current=2, limit=50),
        io=(IoDeviceStats(major=254, minor=0, rbytes=7, wbytes=9),),
    )
    ev = stats_event("c1", stats)
    assert ev["type"] == "stats" and ev["id"] == "c1"
    assert ev["data"]["cpu"]["usage"]["total"] == 10_000
    assert ev["data"]["memory"]["usage"] == {"usage": 1000, "limit": 4096}
    assert ev["data"]["pids"] == {"current": 2, "limit": 50}
    assert {"major": 254, "minor": 0, "op": "Write", "value": 9} in ev["data"]["blkio"]["ioServiceBytesRecursive"]
    json.dumps(ev)
