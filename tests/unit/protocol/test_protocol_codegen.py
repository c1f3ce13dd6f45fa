"""The generated code is what scripts/genproto makes, and the schemas keep their wire contracts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool

from cocoon.protocol.gen.agent.v1 import agent_pb2
from cocoon.protocol.gen.containerd.events import task_pb2 as events_pb2
from cocoon.protocol.gen.containerd.services.events.ttrpc.v1 import events_pb2 as forward_pb2
from cocoon.protocol.gen.containerd.task.v2 import shim_pb2
from cocoon.protocol.gen.containerd.types import mount_pb2
from cocoon.protocol.gen.containerd.types.task import task_pb2
from cocoon.protocol.gen.google.rpc import status_pb2
from cocoon.protocol.gen.ttrpc import request_pb2

ROOT = Path(__file__).resolve().parents[3]
GEN = ROOT / "src" / "cocoon" / "protocol" / "gen"

# google/rpc/status_pb2.py of googleapis-common-protos: the serialized descriptor we must match
# byte for byte so both can be registered in one descriptor pool.
GOOGLEAPIS_STATUS = (
    b"\n\x17google/rpc/status.proto\x12\ngoogle.rpc\x1a\x19google/protobuf/any.proto\"N\n\x06Status\x12\x0c"
    b"\n\x04code\x18\x01 \x01(\x05\x12\x0f\n\x07message\x18\x02 \x01(\t\x12%\n\x07details\x18\x03 \x03(\x0b"
    b"2\x14.google.protobuf.AnyBa\n\x0ecom.google.rpcB\x0bStatusProtoP\x01Z7google.golang.org/genproto/"
    b"googleapis/rpc/status;status\xf8\x01\x01\xa2\x02\x03RPCb\x06proto3"
)


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_up_to_date(tmp_path):
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpc_tools is not importable: install grpcio-tools==1.85.1 to check the generated code")
    if metadata.version("grpcio-tools") != "1.85.1":
        pytest.skip(f"grpcio-tools {metadata.version('grpcio-tools')} installed; the output is pinned to 1.85.1")
    out = tmp_path / "gen"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "genproto"), "--out", str(out)], check=True,
                   stdin=subprocess.DEVNULL, timeout=120)
    fresh, committed = _files(out), _files(GEN)
    assert sorted(fresh) == sorted(committed), "run scripts/genproto: the set of generated files changed"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"run scripts/genproto: stale generated files {stale}"


def test_status_is_registered_exactly_like_googleapis():
    assert status_pb2.DESCRIPTOR.serialized_pb == GOOGLEAPIS_STATUS
    # The pool accepts the identical file again, so googleapis-common-protos can be imported too.
    assert descriptor_pool.Default().AddSerializedFile(GOOGLEAPIS_STATUS) is not None


def test_our_files_do_not_take_foreign_paths():
    for module in (agent_pb2, events_pb2, forward_pb2, shim_pb2, mount_pb2, task_pb2, request_pb2):
        assert module.DESCRIPTOR.name.startswith("cocoon/"), module.DESCRIPTOR.name


def _fields(message) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_ttrpc_envelope_field_numbers():
    assert request_pb2.DESCRIPTOR.package == "ttrpc"
    assert _fields(request_pb2.Request) == {
        "service": 1, "method": 2, "payload": 3, "timeout_nano": 4, "metadata": 5,
    }
    assert _fields(request_pb2.Response) == {"status": 1, "payload": 2}
    assert _fields(request_pb2.KeyValue) == {"key": 1, "value": 2}


def test_shim_task_v2_matches_containerd():
    service = shim_pb2.DESCRIPTOR.services_by_name["Task"]
    assert service.full_name == "containerd.task.v2.Task"
    assert [m.name for m in service.methods] == [
        "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill", "Exec",
        "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown",
    ]
    assert _fields(shim_pb2.CreateTaskRequest) == {
        "id": 1, "bundle": 2, "rootfs": 3, "terminal": 4, "stdin": 5, "stdout": 6, "stderr": 7,
        "checkpoint": 8, "parent_checkpoint": 9, "options": 10,
    }
    assert _fields(shim_pb2.StateResponse)["exec_id"] == 11
    assert _fields(shim_pb2.UpdateTaskRequest) == {"id": 1, "resources": 2, "annotations": 3}
    status = shim_pb2.StateResponse.DESCRIPTOR.fields_by_name["status"]
    assert status.enum_type.full_name == "containerd.v1.types.Status"
    assert _fields(mount_pb2.Mount) == {"type": 1, "source": 2, "target": 3, "options": 4}
    assert mount_pb2.Mount.DESCRIPTOR.full_name == "containerd.types.Mount"
    assert task_pb2.ProcessInfo.DESCRIPTOR.full_name == "containerd.v1.types.ProcessInfo"


def test_events_match_containerd():
    assert events_pb2.DESCRIPTOR.package == "containerd.events"
    assert _fields(events_pb2.TaskExit) == {"container_id": 1, "id": 2, "pid": 3, "exit_status": 4, "exited_at": 5}
    assert _fields(events_pb2.TaskCreate) == {
        "container_id": 1, "bundle": 2, "rootfs": 3, "io": 4, "checkpoint": 5, "pid": 6,
    }
    for name in ("TaskStart", "TaskDelete", "TaskIO", "TaskOOM", "TaskExecAdded", "TaskExecStarted", "TaskPaused",
                 "TaskResumed", "TaskCheckpointed"):
        assert name in events_pb2.DESCRIPTOR.message_types_by_name
    service = forward_pb2.DESCRIPTOR.services_by_name["Events"]
    assert service.full_name == "containerd.services.events.ttrpc.v1.Events"
    assert [m.name for m in service.methods] == ["Forward"]
    assert _fields(forward_pb2.Envelope) == {"timestamp": 1, "namespace": 2, "topic": 3, "event": 4}


def test_agent_api_has_the_kata_names():
    agent = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
    assert agent.full_name == "cocoon.agent.v1.AgentService"
    expected = {
        "CreateSandbox", "DestroySandbox", "CreateContainer", "StartContainer", "RemoveContainer", "ExecProcess",
        "SignalProcess", "WaitProcess", "WriteStdin", "ReadStdout", "ReadStderr", "CloseStdin", "TtyWinResize",
        "PauseContainer", "ResumeContainer", "StatsContainer", "UpdateContainer", "UpdateInterface",
        "UpdateRoutes", "AddARPNeighbors", "ListInterfaces", "ListRoutes", "GetGuestDetails", "OnlineCPUMem",
        "SetGuestDateTime", "CopyFile", "GetOOMEvent", "ReseedRandomDev", "PrepareSnapshot", "ListProcesses",
    }
    assert {m.name for m in agent.methods} == expected
    health = agent_pb2.DESCRIPTOR.services_by_name["Health"]
    assert [m.name for m in health.methods] == ["Check", "Version"]
