"""A bundle's config.json, loaded and checked into frozen dataclasses.

Only what a VM runtime honours is modelled; everything else stays in :attr:`Spec.raw`, the whole
document as read, which the guest gets (adjusted) as JSON. Unknown properties are ignored, as the
runtime spec requires. Every refusal is one line naming the file and the JSON path of the field::

    process.user.uid: expected an integer, got a string (field=process.user.uid, file=/b/config.json)

``null`` reads as absent for optional fields (Go's encoding/json does the same).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from cocoon.errors import InvalidArgument, NotFound
from cocoon.oci.defaults import NAMESPACES, OCI_VERSION, OCI_VERSION_MIN, default_spec, features
from cocoon.oci.model import (
    Capabilities,
    ConsoleSize,
    Cpu,
    Device,
    DeviceRule,
    Hook,
    Hooks,
    IDMapping,
    Linux,
    Memory,
    Mount,
    Namespace,
    Process,
    Resources,
    Rlimit,
    Root,
    Spec,
    User,
)

__all__ = [
    "NAMESPACES", "OCI_VERSION", "OCI_VERSION_MIN", "Capabilities", "ConsoleSize", "Cpu", "Device", "DeviceRule",
    "Hook", "Hooks", "IDMapping", "Linux", "Memory", "Mount", "Namespace", "Process", "Resources", "Rlimit", "Root",
    "Spec", "User", "default_spec", "features", "load", "parse", "parse_process",
]  # fmt: skip

# 1.0.x to 1.2.x, pre-releases and build metadata included ("1.0.2-dev", "1.1.0-rc.1").
_VERSION_RE = re.compile(r"1\.[0-2]\.\d+(?:[-+][0-9A-Za-z.+-]*)?", re.ASCII)
_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*", re.ASCII)

U16 = (0, 2**16 - 1)
U32 = (0, 2**32 - 1)
I64 = (-(2**63), 2**63 - 1)
U64 = (0, 2**64 - 1)


# --------------------------------------------------------------------------------------------------
# Reading helpers: each raises _Bad(json_path, problem); parse() turns it into InvalidArgument.
# --------------------------------------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _expected(path: str, what: str, value: Any) -> _Bad:
    return _Bad(path, f"expected {what}, got {_kind(value)}")


def _at(parent: str, key: str) -> str:
    if not parent:
        return key
    return f"{parent}.{key}" if _SIMPLE_KEY.fullmatch(key) else f"{parent}[{json.dumps(key)}]"


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _expected(path, "an object", value)
    return value


def _opt_obj(data: dict[str, Any], key: str, parent: str) -> dict[str, Any] | None:
    value = data.get(key)
    return None if value is None else _obj(value, _at(parent, key))


def _str(data: dict[str, Any], key: str, parent: str, *, required: bool = False) -> str:
    value = data.get(key)
    path = _at(parent, key)
    if value is None:
        if required:
            raise _Bad(path, "required")
        return ""
    if not isinstance(value, str):
        raise _expected(path, "a string", value)
    return value


def _abs_path(data: dict[str, Any], key: str, parent: str, *, required: bool = False) -> str:
    value = _str(data, key, parent, required=required)
    if value and not value.startswith("/"):
        raise _Bad(_at(parent, key), f"must be an absolute path, got {value!r}")
    return value


def _bool(data: dict[str, Any], key: str, parent: str) -> bool:
    value = data.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _expected(_at(parent, key), "a boolean", value)
    return value


def _check_int(value: Any, path: str, bounds: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _expected(path, "an integer", value)
    if not bounds[0] <= value <= bounds[1]:
        raise _Bad(path, f"out of range ({bounds[0]}..{bounds[1]}), got {value}")
    return value


def _int(data: dict[str, Any], key: str, parent: str, bounds: tuple[int, int]) -> int | None:
    value = data.get(key)
    return None if value is None else _check_int(value, _at(parent, key), bounds)


def _req_int(data: dict[str, Any], key: str, parent: str, bounds: tuple[int, int]) -> int:
    value = _int(data, key, parent, bounds)
    if value is None:
        raise _Bad(_at(parent, key), "required")
    return value


def _array(data: dict[str, Any], key: str, parent: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _expected(_at(parent, key), "an array", value)
    return value


def _strs(data: dict[str, Any], key: str, parent: str, *, no_nul: bool = False) -> tuple[str, ...]:
    path = _at(parent, key)
    out = []
    for i, item in enumerate(_array(data, key, parent)):
        if not isinstance(item, str):
            raise _expected(f"{path}[{i}]", "a string", item)
        if no_nul and "\0" in item:
            raise _Bad(f"{path}[{i}]", "must not contain a NUL character")
        out.append(item)
    return tuple(out)


def _objects(data: dict[str, Any], key: str, parent: str) -> list[tuple[str, dict[str, Any]]]:
    path = _at(parent, key)
    return [(f"{path}[{i}]", _obj(item, f"{path}[{i}]")) for i, item in enumerate(_array(data, key, parent))]


def _str_map(data: dict[str, Any], key: str, parent: str) -> dict[str, str]:
    obj = _opt_obj(data, key, parent) or {}
    path = _at(parent, key)
    for k, v in obj.items():
        if not isinstance(v, str):
            raise _expected(_at(path, k), "a string", v)
    return dict(obj)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def _version(data: dict[str, Any]) -> str:
    version = _str(data, "ociVersion", "", required=True)
    if not _VERSION_RE.fullmatch(version):
        raise _Bad("ociVersion", f"unsupported version {version!r} (supported: {OCI_VERSION_MIN} to 1.2.x)")
    return version


def _root(data: dict[str, Any], bundle: Path) -> Root:
    obj = _opt_obj(data, "root", "")
    if obj is None:
        raise _Bad("root", "required")
    path = _str(obj, "path", "root", required=True)
    if not path:
        raise _Bad("root.path", "must not be empty")
    # Like runc: joined to the bundle and cleaned, symlinks not followed.
    return Root(path=Path(os.path.normpath(os.path.join(bundle, path))), readonly=_bool(obj, "readonly", "root"))


def _user(data: dict[str, Any], parent: str) -> User:
    obj = _opt_obj(data, "user", parent) or {}
    at = _at(parent, "user")
    gids = _array(obj, "additionalGids", at)
    return User(
        uid=_int(obj, "uid", at, U32) or 0,
        gid=_int(obj, "gid", at, U32) or 0,
        umask=_int(obj, "umask", at, U32),
        additional_gids=tuple(_check_int(g, f"{at}.additionalGids[{i}]", U32) for i, g in enumerate(gids)),
    )


def _capabilities(data: dict[str, Any], parent: str) -> Capabilities | None:
    obj = _opt_obj(data, "capabilities", parent)
    if obj is None:
        return None
    at = _at(parent, "capabilities")
    return Capabilities(**{name: _strs(obj, name, at) for name in Capabilities.__dataclass_fields__})


def _rlimits(data: dict[str, Any], parent: str) -> tuple[Rlimit, ...]:
    out: list[Rlimit] = []
    for at, obj in _objects(data, "rlimits", parent):
        kind = _str(obj, "type", at, required=True)
        if any(r.type == kind for r in out):
            raise _Bad(f"{at}.type", f"duplicate rlimit {kind!r}")
        out.append(Rlimit(type=kind, hard=_req_int(obj, "hard", at, U64), soft=_req_int(obj, "soft", at, U64)))
    return tuple(out)


def _process(data: dict[str, Any], at: str) -> Process:
    args_path = _at(at, "args")
    if data.get("args") is None:
        raise _Bad(args_path, "required")
    args = _strs(data, "args", at, no_nul=True)
    if not args:
        raise _Bad(args_path, "must not be empty")
    cwd = _abs_path(data, "cwd", at, required=True)
    if not cwd:
        raise _Bad(_at(at, "cwd"), "must be an absolute path, got ''")
    console = _opt_obj(data, "consoleSize", at)
    console_at = _at(at, "consoleSize")
    return Process(
        args=args,
        cwd=cwd,
        terminal=_bool(data, "terminal", at),
        console_size=None
        if console is None
        else ConsoleSize(_req_int(console, "height", console_at, U32), _req_int(console, "width", console_at, U32)),
        user=_user(data, at),
        env=_strs(data, "env", at, no_nul=True),
        capabilities=_capabilities(data, at),
        rlimits=_rlimits(data, at),
        no_new_privileges=_bool(data, "noNewPrivileges", at),
        oom_score_adj=_int(data, "oomScoreAdj", at, (-1000, 1000)),
        apparmor_profile=_str(data, "apparmorProfile", at),
        selinux_label=_str(data, "selinuxLabel", at),
    )


def _mounts(data: dict[str, Any]) -> tuple[Mount, ...]:
    out = []
    for at, obj in _objects(data, "mounts", ""):
        dest = _str(obj, "destination", at, required=True)
        if not dest:
            raise _Bad(f"{at}.destination", "must not be empty")
        out.append(
            Mount(destination=dest, type=_str(obj, "type", at), source=_str(obj, "source", at),
                  options=_strs(obj, "options", at))
        )  # fmt: skip
    return tuple(out)


def _hooks(data: dict[str, Any]) -> Hooks:
    obj = _opt_obj(data, "hooks", "") or {}

    def stage(name: str) -> tuple[Hook, ...]:
        out = []
        for at, hook in _objects(obj, name, "hooks"):
            timeout = _int(hook, "timeout", at, I64)
            if timeout is not None and timeout <= 0:
                raise _Bad(f"{at}.timeout", f"must be greater than zero, got {timeout}")
            out.append(Hook(path=_abs_path(hook, "path", at, required=True), args=_strs(hook, "args", at),
                            env=_strs(hook, "env", at), timeout=timeout))  # fmt: skip
        return tuple(out)

    return Hooks(
        prestart=stage("prestart"),
        create_runtime=stage("createRuntime"),
        create_container=stage("createContainer"),
        start_container=stage("startContainer"),
        poststart=stage("poststart"),
        poststop=stage("poststop"),
    )


def _namespaces(data: dict[str, Any]) -> tuple[Namespace, ...]:
    out: list[Namespace] = []
    for at, obj in _objects(data, "namespaces", "linux"):
        kind = _str(obj, "type", at, required=True)
        if kind not in NAMESPACES:
            raise _Bad(f"{at}.type", f"unknown namespace {kind!r} (known: {', '.join(sorted(NAMESPACES))})")
        if any(ns.type == kind for ns in out):
            raise _Bad(f"{at}.type", f"duplicate namespace {kind!r}")
        out.append(Namespace(type=kind, path=_abs_path(obj, "path", at)))
    return tuple(out)


def _mappings(data: dict[str, Any], key: str) -> tuple[IDMapping, ...]:
    return tuple(
        IDMapping(container_id=_req_int(obj, "containerID", at, U32), host_id=_req_int(obj, "hostID", at, U32),
                  size=_req_int(obj, "size", at, U32))
        for at, obj in _objects(data, key, "linux")
    )  # fmt: skip


def _resources(data: dict[str, Any]) -> Resources | None:
    obj = _opt_obj(data, "resources", "linux")
    if obj is None:
        return None
    at = "linux.resources"
    mem = _opt_obj(obj, "memory", at) or {}
    mem_at = f"{at}.memory"
    cpu = _opt_obj(obj, "cpu", at) or {}
    cpu_at = f"{at}.cpu"
    pids = _opt_obj(obj, "pids", at) or {}
    blkio = _opt_obj(obj, "blockIO", at) or {}
    rules = tuple(
        DeviceRule(
            allow=_req_bool(rule, "allow", rule_at),
            type=_str(rule, "type", rule_at) or "a",
            major=_int(rule, "major", rule_at, I64),
            minor=_int(rule, "minor", rule_at, I64),
            access=_str(rule, "access", rule_at) or "rwm",
        )
        for rule_at, rule in _objects(obj, "devices", at)
    )
    return Resources(
        memory=Memory(limit=_int(mem, "limit", mem_at, I64), reservation=_int(mem, "reservation", mem_at, I64),
                      swap=_int(mem, "swap", mem_at, I64)),
        cpu=Cpu(shares=_int(cpu, "shares", cpu_at, U64), quota=_int(cpu, "quota", cpu_at, I64),
                period=_int(cpu, "period", cpu_at, U64), cpus=_str(cpu, "cpus", cpu_at),
                mems=_str(cpu, "mems", cpu_at)),
        pids_limit=_int(pids, "limit", f"{at}.pids", I64),
        block_io_weight=_int(blkio, "weight", f"{at}.blockIO", U16),
        devices=rules,
    )  # fmt: skip


def _req_bool(data: dict[str, Any], key: str, parent: str) -> bool:
    if data.get(key) is None:
        raise _Bad(_at(parent, key), "required")
    return _bool(data, key, parent)


def _devices(data: dict[str, Any]) -> tuple[Device, ...]:
    out = []
    for at, obj in _objects(data, "devices", "linux"):
        path = _abs_path(obj, "path", at, required=True)
        kind = _str(obj, "type", at, required=True)
        if kind not in ("c", "b", "u", "p"):
            raise _Bad(f"{at}.type", f"unknown device type {kind!r} (expected c, b, u or p)")
        # A FIFO has no device number; the others must say which device they are.
        read = _int if kind == "p" else _req_int
        out.append(Device(path=path, type=kind, major=read(obj, "major", at, I64) or 0,
                          minor=read(obj, "minor", at, I64) or 0,
                          file_mode=_int(obj, "fileMode", at, U32), uid=_int(obj, "uid", at, U32),
                          gid=_int(obj, "gid", at, U32)))  # fmt: skip
    return tuple(out)


def _linux(data: dict[str, Any]) -> Linux | None:
    obj = _opt_obj(data, "linux", "")
    if obj is None:
        return None
    return Linux(
        namespaces=_namespaces(obj),
        uid_mappings=_mappings(obj, "uidMappings"),
        gid_mappings=_mappings(obj, "gidMappings"),
        resources=_resources(obj),
        cgroups_path=_str(obj, "cgroupsPath", "linux"),
        devices=_devices(obj),
        masked_paths=_strs(obj, "maskedPaths", "linux"),
        readonly_paths=_strs(obj, "readonlyPaths", "linux"),
        sysctl=_str_map(obj, "sysctl", "linux"),
        seccomp=_opt_obj(obj, "seccomp", "linux"),
        rootfs_propagation=_str(obj, "rootfsPropagation", "linux"),
    )


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def parse(
    data: Any, *, bundle: str | os.PathLike[str], source: str, require_process: bool = True, sha256: str = ""
) -> Spec:
    """Check an already decoded config.json; ``source`` names the file in errors.

    ``require_process``: create needs ``process`` (with non-empty ``args`` and an absolute ``cwd``),
    as runc does; commands that only read the bundle (delete's poststop hooks) do not.
    """
    if not isinstance(data, dict):
        raise InvalidArgument(f"expected an object at the top level, got {_kind(data)}", file=source)
    bdir = Path(os.path.abspath(bundle))
    try:
        version = _version(data)
        proc = _opt_obj(data, "process", "")
        if proc is None and require_process:
            raise _Bad("process", "required")
        return Spec(
            oci_version=version,
            bundle=bdir,
            path=bdir / "config.json",
            root=_root(data, bdir),
            process=None if proc is None else _process(proc, "process"),
            hostname=_str(data, "hostname", ""),
            domainname=_str(data, "domainname", ""),
            mounts=_mounts(data),
            hooks=_hooks(data),
            annotations=_str_map(data, "annotations", ""),
            linux=_linux(data),
            sha256=sha256,
            raw=data,
        )
    except _Bad as bad:
        raise InvalidArgument(f"{bad.path}: {bad.problem}", field=bad.path, file=source) from None


def parse_process(data: Any, *, source: str) -> Process:
    """Check a process.json (``exec --process``); field paths are relative to the process object."""
    try:
        return _process(_obj(data, "(top level)"), "")
    except _Bad as bad:
        raise InvalidArgument(f"{bad.path}: {bad.problem}", field=bad.path, file=source) from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load(bundle: str | os.PathLike[str], *, require_process: bool = True) -> Spec:
    """Load ``<bundle>/config.json``.

    Raises NotFound for a missing bundle or config.json, InvalidArgument for anything unreadable,
    not JSON, or not a valid spec — one line naming the file (and line/column or field).
    """
    bdir = Path(os.path.abspath(bundle))
    if not bdir.exists():
        raise NotFound("bundle not found", path=str(bdir))
    if not bdir.is_dir():
        raise InvalidArgument("bundle is not a directory", path=str(bdir))
    cfg = bdir / "config.json"
    source = str(cfg)
    try:
        blob = cfg.read_bytes()
    except FileNotFoundError:
        raise NotFound("config.json not found in bundle", file=source) from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read config.json: {exc.strerror or exc}", file=source) from None
    try:
        data = json.loads(blob.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"config.json is not UTF-8 (byte {exc.start})", file=source) from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            file=source, line=exc.lineno, column=exc.colno,
        ) from None  # fmt: skip
    except ValueError as exc:
        raise InvalidArgument(f"invalid JSON: {exc}", file=source) from None
    import hashlib  # only create pays for it

    return parse(data, bundle=bdir, source=source, require_process=require_process,
                 sha256=hashlib.sha256(blob).hexdigest())  # fmt: skip
