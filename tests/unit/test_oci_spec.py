from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from cocoon.errors import InvalidArgument, NotFound
from cocoon.oci import spec as oci
from cocoon.oci.spec import default_spec, features, load, parse_process


def _minimal() -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/"},
    }


def _bundle(tmp_path: Path, config: Any) -> Path:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (tmp_path / "config.json").write_text(text)
    return tmp_path


def _one_line_naming(err: Exception, *needles: str) -> str:
    text = str(err)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


# --------------------------------------------------------------------------------------------
# Bad input first: the bundle and the file
# --------------------------------------------------------------------------------------------


def test_missing_bundle_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(NotFound) as info:
        load(missing)
    _one_line_naming(info.value, str(missing), "bundle")
    assert info.value.path == str(missing)


def test_bundle_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(InvalidArgument) as info:
        load(f)
    _one_line_naming(info.value, str(f), "not a directory")


def test_missing_config_json(tmp_path):
    with pytest.raises(NotFound) as info:
        load(tmp_path)
    _one_line_naming(info.value, str(tmp_path / "config.json"))
    assert info.value.file == str(tmp_path / "config.json")


def test_unreadable_config_json(tmp_path):
    # A directory where the file should be fails to read even as root (chmod 000 would not).
    (tmp_path / "config.json").mkdir()
    with pytest.raises(InvalidArgument) as info:
        load(tmp_path)
    _one_line_naming(info.value, "cannot read", str(tmp_path / "config.json"))


def test_invalid_json_names_line_and_column(tmp_path):
    bundle = _bundle(tmp_path, '{\n  "ociVersion": "1.0.2",\n  "root": {"path": "rootfs",}\n}\n')
    with pytest.raises(InvalidArgument) as info:
        load(bundle)
    _one_line_naming(info.value, "invalid JSON", "config.json")
    assert info.value.line == 3
    assert isinstance(info.value.column, int)
    assert "line 3" in str(info.value)


def test_not_utf8(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"ociVersion": "\xff\xfe\xfa"}')
    with pytest.raises(InvalidArgument) as info:
        load(tmp_path)
    _one_line_naming(info.value, "config.json")


def test_top_level_must_be_an_object(tmp_path):
    with pytest.raises(InvalidArgument) as info:
        load(_bundle(tmp_path, [1, 2]))
    _one_line_naming(info.value, "expected an object", "config.json")


# --------------------------------------------------------------------------------------------
# Bad input: ociVersion
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.0.0", "0.5.0", "1.3.0", "1.10.0", "1", "latest", "", "1.0"])
def test_unsupported_oci_version(tmp_path, version):
    cfg = _minimal()
    cfg["ociVersion"] = version
    with pytest.raises(InvalidArgument) as info:
        load(_bundle(tmp_path, cfg))
    _one_line_naming(info.value, "ociVersion", "config.json")
    assert info.value.field == "ociVersion"


def test_oci_version_missing_or_not_a_string(tmp_path):
    cfg = _minimal()
    del cfg["ociVersion"]
    with pytest.raises(InvalidArgument, match=r"^ociVersion: required") as info:
        load(_bundle(tmp_path, cfg))
    assert info.value.field == "ociVersion"
    cfg["ociVersion"] = 1.0
    with pytest.raises(InvalidArgument, match=r"^ociVersion: expected a string"):
        load(_bundle(tmp_path, cfg))


@pytest.mark.parametrize("version", ["1.0.0", "1.0.1", "1.0.2", "1.0.2-dev", "1.1.0-rc.1", "1.1.0", "1.2.0", "1.2.1"])
def test_supported_oci_versions(tmp_path, version):
    cfg = _minimal()
    cfg["ociVersion"] = version
    assert load(_bundle(tmp_path, cfg)).oci_version == version


# --------------------------------------------------------------------------------------------
# Bad input: every field of the wrong type or value names its JSON path
# --------------------------------------------------------------------------------------------


def _set(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """Set cfg[a][b][0][c] = value for 'a.b.0.c', creating objects on the way; value _DELETE removes."""
    parts = dotted.split(".")
    node: Any = cfg
    for part in parts[:-1]:
        key: Any = int(part) if part.isdigit() else part
        if isinstance(node, dict) and key not in node:
            node[key] = {}
        node = node[key]
    last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()

_FULL_LISTS = {
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
    "hooks": {"prestart": [{"path": "/bin/true"}], "poststop": [{"path": "/bin/true"}]},
    "process.rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
    "linux.namespaces": [{"type": "pid"}, {"type": "network"}],
    "linux.resources.devices": [{"allow": False, "access": "rwm"}],
    "linux.devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
    "linux.uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}],
}


@pytest.mark.parametrize(
    ("dotted", "value", "field", "phrase"),
    [
        ("process.user.uid", "0", "process.user.uid", "expected an integer"),
        ("process.user.uid", True, "process.user.uid", "expected an integer"),
        ("process.user.uid", -1, "process.user.uid", "out of range"),
        ("process.user.uid", 2**32, "process.user.uid", "out of range"),
        ("process.user.gid", 1.5, "process.user.gid", "expected an integer"),
        ("process.user.umask", "022", "process.user.umask", "expected an integer"),
        ("process.user.additionalGids", "5", "process.user.additionalGids", "expected an array"),
        ("process.user.additionalGids", [1, "x"], "process.user.additionalGids[1]", "expected an integer"),
        ("process.user", [], "process.user", "expected an object"),
        ("process.terminal", "yes", "process.terminal", "expected a boolean"),
        ("process.consoleSize", {"height": "x", "width": 80}, "process.consoleSize.height", "expected an integer"),
        ("process.args", "sh", "process.args", "expected an array"),
        ("process.args", [], "process.args", "must not be empty"),
        ("process.args", [1], "process.args[0]", "expected a string"),
        ("process.args", _DELETE, "process.args", "required"),
        ("process.args", ["a\0b"], "process.args[0]", "NUL"),
        ("process.env", [1], "process.env[0]", "expected a string"),
        ("process.env", "PATH=/bin", "process.env", "expected an array"),
        ("process.cwd", "relative/dir", "process.cwd", "absolute"),
        ("process.cwd", _DELETE, "process.cwd", "required"),
        ("process.cwd", 5, "process.cwd", "expected a string"),
        ("process.capabilities", {"bounding": "CAP_KILL"}, "process.capabilities.bounding", "expected an array"),
        ("process.capabilities", {"effective": [7]}, "process.capabilities.effective[0]", "expected a string"),
        ("process.rlimits.0.hard", "x", "process.rlimits[0].hard", "expected an integer"),
        ("process.rlimits.0.type", _DELETE, "process.rlimits[0].type", "required"),
        ("process.rlimits", [{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 1}] * 2, "process.rlimits[1].type",
         "duplicate"),
        ("process.noNewPrivileges", "true", "process.noNewPrivileges", "expected a boolean"),
        ("process.oomScoreAdj", "x", "process.oomScoreAdj", "expected an integer"),
        ("process.oomScoreAdj", 5000, "process.oomScoreAdj", "out of range"),
        ("process.apparmorProfile", 1, "process.apparmorProfile", "expected a string"),
        ("process.selinuxLabel", [], "process.selinuxLabel", "expected a string"),
        ("process", _DELETE, "process", "required"),
        ("process", [], "process", "expected an object"),
        ("root", _DELETE, "root", "required"),
        ("root.path", _DELETE, "root.path", "required"),
        ("root.path", 1, "root.path", "expected a string"),
        ("root.path", "", "root.path", "must not be empty"),
        ("root.readonly", "no", "root.readonly", "expected a boolean"),
        ("hostname", 1, "hostname", "expected a string"),
        ("domainname", False, "domainname", "expected a string"),
        ("mounts", {}, "mounts", "expected an array"),
        ("mounts.0", "x", "mounts[0]", "expected an object"),
        ("mounts.0.destination", _DELETE, "mounts[0].destination", "required"),
        ("mounts.0.options", "ro", "mounts[0].options", "expected an array"),
        ("mounts.0.type", 3, "mounts[0].type", "expected a string"),
        ("hooks", [], "hooks", "expected an object"),
        ("hooks.prestart.0.path", "bin/true", "hooks.prestart[0].path", "absolute"),
        ("hooks.poststart", "x", "hooks.poststart", "expected an array"),
        ("hooks.poststop.0.timeout", 0, "hooks.poststop[0].timeout", "greater than zero"),
        ("hooks.createRuntime", [{"path": "/x", "args": "x"}], "hooks.createRuntime[0].args", "expected an array"),
        ("hooks.startContainer", [{"path": "/x", "env": [1]}], "hooks.startContainer[0].env[0]", "expected a string"),
        ("annotations", [], "annotations", "expected an object"),
        ("annotations", {"foo": 1}, "annotations.foo", "expected a string"),
        ("linux", "x", "linux", "expected an object"),
        ("linux.namespaces.0.type", "bogus", "linux.namespaces[0].type", "unknown namespace"),
        ("linux.namespaces.1.type", "pid", "linux.namespaces[1].type", "duplicate"),
        ("linux.namespaces.1.path", 5, "linux.namespaces[1].path", "expected a string"),
        ("linux.namespaces.1.path", "var/run/netns/x", "linux.namespaces[1].path", "absolute"),
        ("linux.resources.memory.limit", "1G", "linux.resources.memory.limit", "expected an integer"),
        ("linux.resources.memory.swap", 2**63, "linux.resources.memory.swap", "out of range"),
        ("linux.resources.cpu.shares", -1, "linux.resources.cpu.shares", "out of range"),
        ("linux.resources.cpu.cpus", 3, "linux.resources.cpu.cpus", "expected a string"),
        ("linux.resources.pids.limit", "x", "linux.resources.pids.limit", "expected an integer"),
        ("linux.resources.blockIO.weight", 70000, "linux.resources.blockIO.weight", "out of range"),
        ("linux.resources.devices.0.allow", "yes", "linux.resources.devices[0].allow", "expected a boolean"),
        ("linux.resources", [], "linux.resources", "expected an object"),
        ("linux.maskedPaths", "x", "linux.maskedPaths", "expected an array"),
        ("linux.readonlyPaths", [1], "linux.readonlyPaths[0]", "expected a string"),
        ("linux.sysctl", {"net.ipv4.ip_forward": 1}, 'linux.sysctl["net.ipv4.ip_forward"]', "expected a string"),
        ("linux.seccomp", "x", "linux.seccomp", "expected an object"),
        ("linux.devices.0.path", _DELETE, "linux.devices[0].path", "required"),
        ("linux.devices.0.type", "x", "linux.devices[0].type", "device type"),
        ("linux.devices.0.major", _DELETE, "linux.devices[0].major", "required"),
        ("linux.cgroupsPath", 5, "linux.cgroupsPath", "expected a string"),
        ("linux.uidMappings.0.hostID", "x", "linux.uidMappings[0].hostID", "expected an integer"),
        ("linux.gidMappings", {}, "linux.gidMappings", "expected an array"),
    ],
)
def test_bad_field_names_json_path_and_file(tmp_path, dotted, value, field, phrase):
    cfg = _minimal()
    for key, default in _FULL_LISTS.items():
        _set(cfg, key, copy.deepcopy(default))
    load(_bundle(tmp_path, cfg))  # the baseline is valid
    _set(cfg, dotted, value)
    with pytest.raises(InvalidArgument) as info:
        load(_bundle(tmp_path, cfg))
    text = _one_line_naming(info.value, str(tmp_path / "config.json"), phrase)
    assert text.startswith(f"{field}: "), text
    assert info.value.field == field
    assert info.value.file == str(tmp_path / "config.json")


def test_process_may_be_absent_when_not_required(tmp_path):
    cfg = _minimal()
    del cfg["process"]
    spec = load(_bundle(tmp_path, cfg), require_process=False)
    assert spec.process is None


def test_parse_process_for_exec_names_its_own_file():
    with pytest.raises(InvalidArgument) as info:
        parse_process({"args": ["sh"], "cwd": "x"}, source="/tmp/process.json")
    _one_line_naming(info.value, "process.json", "cwd")
    assert info.value.field == "cwd"
    proc = parse_process({"args": ["ls", "-l"], "cwd": "/", "env": ["A=1"], "terminal": True}, source="p.json")
    assert proc.args == ("ls", "-l")
    assert proc.terminal is True
    assert proc.user.uid == 0


# --------------------------------------------------------------------------------------------
# Good input
# --------------------------------------------------------------------------------------------


def _full_config() -> dict[str, Any]:
    return {
        "ociVersion": "1.2.0",
        "root": {"path": "rootfs", "readonly": True},
        "process": {
            "terminal": True,
            "consoleSize": {"height": 24, "width": 80},
            "user": {"uid": 1000, "gid": 1000, "umask": 18, "additionalGids": [5, 10]},
            "args": ["/bin/app", "--flag"],
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/srv",
            "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "ambient": []},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 1024}],
            "noNewPrivileges": True,
            "oomScoreAdj": -500,
            "apparmorProfile": "docker-default",
            "selinuxLabel": "system_u:system_r:container_t:s0",
        },
        "hostname": "box",
        "domainname": "example.org",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
        ],
        "hooks": {
            "prestart": [{"path": "/usr/bin/hook", "args": ["hook", "prestart"], "env": ["X=1"], "timeout": 5}],
            "createRuntime": [{"path": "/usr/bin/cni-hook"}],
            "poststop": [{"path": "/usr/bin/cleanup"}],
        },
        "annotations": {"io.kubernetes.cri.sandbox-id": "abc", "org.example": ""},
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1234"},
                {"type": "mount"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "cgroup"},
            ],
            "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
            "resources": {
                "memory": {"limit": 536870912, "reservation": 268435456, "swap": -1},
                "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"},
                "pids": {"limit": 100},
                "blockIO": {"weight": 500},
                "devices": [{"allow": False, "access": "rwm"}, {"allow": True, "type": "c", "major": 1,
                                                                 "minor": 3, "access": "rwm"}],
            },
            "cgroupsPath": "/kubepods/pod1/abc",
            "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
            "sysctl": {"net.ipv4.ip_forward": "1"},
            "seccomp": {
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}],
            },
            "rootfsPropagation": "rprivate",
        },
        "someFutureField": {"ignored": True},
    }


def test_full_config_is_loaded_into_dataclasses(tmp_path):
    cfg = _full_config()
    bundle = _bundle(tmp_path, cfg)
    spec = load(bundle)
    assert spec.bundle == bundle
    assert spec.path == bundle / "config.json"
    assert spec.raw == cfg
    assert spec.sha256 == hashlib.sha256((bundle / "config.json").read_bytes()).hexdigest()
    assert spec.root.path == bundle / "rootfs"
    assert spec.root.readonly is True
    p = spec.process
    assert p is not None
    assert p.terminal and p.console_size == oci.ConsoleSize(height=24, width=80)
    assert p.user == oci.User(uid=1000, gid=1000, umask=18, additional_gids=(5, 10))
    assert p.args == ("/bin/app", "--flag")
    assert p.env == ("PATH=/bin", "TERM=xterm")
    assert p.cwd == "/srv"
    assert p.capabilities is not None and p.capabilities.bounding == ("CAP_KILL",)
    assert p.capabilities.permitted == ()
    assert p.rlimits == (oci.Rlimit(type="RLIMIT_NOFILE", hard=4096, soft=1024),)
    assert p.no_new_privileges is True
    assert p.oom_score_adj == -500
    assert p.apparmor_profile == "docker-default"
    assert p.selinux_label.startswith("system_u")
    assert spec.hostname == "box" and spec.domainname == "example.org"
    assert spec.mounts[1] == oci.Mount(destination="/data", type="bind", source="/srv/data", options=("rbind", "ro"))
    assert spec.hooks.prestart[0] == oci.Hook(path="/usr/bin/hook", args=("hook", "prestart"), env=("X=1",), timeout=5)
    assert spec.hooks.create_runtime[0].path == "/usr/bin/cni-hook"
    assert spec.hooks.poststart == ()
    assert spec.annotations == {"io.kubernetes.cri.sandbox-id": "abc", "org.example": ""}
    linux = spec.linux
    assert linux is not None
    assert linux.network_namespace == oci.Namespace(type="network", path="/var/run/netns/cni-1234")
    assert linux.namespace("pid") == oci.Namespace(type="pid", path="")
    assert linux.namespace("user") is None
    assert linux.uid_mappings == (oci.IDMapping(container_id=0, host_id=100000, size=65536),)
    r = linux.resources
    assert r is not None
    assert r.memory == oci.Memory(limit=536870912, reservation=268435456, swap=-1)
    assert r.cpu == oci.Cpu(shares=1024, quota=50000, period=100000, cpus="0-1", mems="0")
    assert r.pids_limit == 100
    assert r.block_io_weight == 500
    assert r.devices[1] == oci.DeviceRule(allow=True, type="c", major=1, minor=3, access="rwm")
    assert linux.cgroups_path == "/kubepods/pod1/abc"
    assert linux.devices[0] == oci.Device(path="/dev/fuse", type="c", major=10, minor=229, file_mode=438)
    assert linux.masked_paths == ("/proc/kcore",)
    assert linux.readonly_paths == ("/proc/sys",)
    assert linux.sysctl == {"net.ipv4.ip_forward": "1"}
    assert linux.seccomp == cfg["linux"]["seccomp"]
    assert linux.rootfs_propagation == "rprivate"


def test_no_network_namespace_means_host_network(tmp_path):
    cfg = _minimal()
    cfg["linux"] = {"namespaces": [{"type": "pid"}]}
    spec = load(_bundle(tmp_path, cfg))
    assert spec.linux is not None and spec.linux.network_namespace is None


def test_absolute_root_path_is_kept_and_relative_is_normalized(tmp_path):
    cfg = _minimal()
    cfg["root"] = {"path": "/srv/rootfs/"}
    assert load(_bundle(tmp_path, cfg)).root.path == Path("/srv/rootfs")
    cfg["root"] = {"path": "./a/../rootfs"}
    assert load(_bundle(tmp_path, cfg)).root.path == tmp_path / "rootfs"


def test_relative_bundle_becomes_absolute(tmp_path, monkeypatch):
    _bundle(tmp_path, _minimal())
    monkeypatch.chdir(tmp_path)
    spec = load(".")
    assert spec.bundle == tmp_path
    assert spec.root.path == tmp_path / "rootfs"


def test_null_optional_fields_read_as_absent(tmp_path):
    cfg = _minimal()
    cfg["hooks"] = None
    cfg["linux"] = {"resources": {"memory": {"limit": None}}, "seccomp": None}
    spec = load(_bundle(tmp_path, cfg))
    assert spec.hooks == oci.Hooks()
    assert spec.linux is not None and spec.linux.seccomp is None
    assert spec.linux.resources is not None and spec.linux.resources.memory.limit is None


def test_spec_is_frozen(tmp_path):
    spec = load(_bundle(tmp_path, _minimal()))
    with pytest.raises(AttributeError):
        spec.hostname = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# default_spec(): what `runc spec` writes
# --------------------------------------------------------------------------------------------


def test_default_spec_matches_runc_spec(tmp_path):
    d = default_spec()
    assert list(d) == ["ociVersion", "process", "root", "hostname", "mounts", "linux"]
    assert d["process"]["args"] == ["sh"]
    assert d["process"]["terminal"] is True
    assert d["process"]["user"] == {"uid": 0, "gid": 0}
    assert d["process"]["cwd"] == "/"
    assert d["process"]["noNewPrivileges"] is True
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    assert d["process"]["capabilities"] == {"bounding": caps, "effective": caps, "permitted": caps}
    assert d["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    assert d["root"] == {"path": "rootfs", "readonly": True}
    assert d["hostname"] == "runc"
    assert [m["destination"] for m in d["mounts"]] == [
        "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup",
    ]
    assert "options" not in d["mounts"][0]
    assert d["mounts"][2]["options"] == ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]
    assert [n["type"] for n in d["linux"]["namespaces"]] == ["pid", "network", "ipc", "uts", "mount", "cgroup"]
    assert "/proc/kcore" in d["linux"]["maskedPaths"] and "/sys/firmware" in d["linux"]["maskedPaths"]
    assert d["linux"]["readonlyPaths"] == ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
    assert d["linux"]["resources"] == {"devices": [{"allow": False, "access": "rwm"}]}
    # Our own parser takes it, as `runc spec && runc run` would.
    spec = load(_bundle(tmp_path, d))
    assert spec.process is not None and spec.process.args == ("sh",)
    assert spec.linux is not None and spec.linux.network_namespace == oci.Namespace("network", "")


def test_default_spec_returns_a_fresh_dict():
    a = default_spec()
    a["process"]["args"].append("x")
    assert default_spec()["process"]["args"] == ["sh"]


def test_default_spec_rootless(tmp_path):
    d = default_spec(rootless=True)
    types = [n["type"] for n in d["linux"]["namespaces"]]
    assert "network" not in types and types[-1] == "user"
    assert d["linux"]["uidMappings"] == [{"containerID": 0, "hostID": os.geteuid(), "size": 1}]
    assert d["linux"]["gidMappings"] == [{"containerID": 0, "hostID": os.getegid(), "size": 1}]
    sys_mount = next(m for m in d["mounts"] if m["destination"] == "/sys")
    assert sys_mount == {"destination": "/sys", "type": "none", "source": "/sys",
                         "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}
    devpts = next(m for m in d["mounts"] if m["destination"] == "/dev/pts")
    assert not any(o.startswith(("gid=", "uid=")) for o in devpts["options"])
    assert "resources" not in d["linux"]
    load(_bundle(tmp_path, d))


# --------------------------------------------------------------------------------------------
# features(): what `runc features` prints, true for Cocoon
# --------------------------------------------------------------------------------------------


def test_features_shape_and_truth(tmp_path):
    f = features()
    json.dumps(f)
    assert f["ociVersionMin"] == "1.0.0"
    assert f["ociVersionMax"].startswith("1.2.")
    assert f["hooks"] == ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"]
    assert "rbind" in f["mountOptions"] and "tmpcopyup" in f["mountOptions"]
    assert f["mountOptions"] == sorted(f["mountOptions"])
    linux = f["linux"]
    assert linux["namespaces"] == sorted(oci.NAMESPACES)
    assert "CAP_SYS_ADMIN" in linux["capabilities"] and "CAP_CHECKPOINT_RESTORE" in linux["capabilities"]
    assert linux["cgroup"]["v2"] is True and linux["cgroup"]["v1"] is False
    assert linux["apparmor"] == {"enabled": False}
    assert linux["selinux"] == {"enabled": False}
    assert linux["seccomp"]["enabled"] is True
    assert "SCMP_ACT_NOTIFY" not in linux["seccomp"]["actions"]  # no listener fd crosses the VM boundary
    ann = f["annotations"]
    assert all(isinstance(v, str) for v in ann.values())
    assert ann["org.opencontainers.runc.checkpoint.enabled"] == "false"
    assert ann["io.cocoon.runtime.vm"] == "true"
    # The advertised range is what the parser accepts.
    for version in (f["ociVersionMin"], f["ociVersionMax"]):
        cfg = _minimal()
        cfg["ociVersion"] = version
        load(_bundle(tmp_path, cfg))
