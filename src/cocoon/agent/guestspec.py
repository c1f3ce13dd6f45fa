"""The host's OCI spec made runnable by crun inside the VM (pure functions, tested on the host).

The host already rewrote ``root.path`` and the mount sources to guest paths. What is left is
what cannot mean anything inside the VM:

* the **network namespace** entry is dropped: the container uses the VM's network, which the
  host wired to the pod's network namespace (the VM *is* the pod's network sandbox);
* other **namespace paths** name files of the host (``/proc/<pid>/ns/ipc`` of a pause process):
  ``ipc`` and ``uts`` entries with a path are dropped so every container of the sandbox shares
  the VM's (the pod sharing they asked for); other types keep a new namespace of their own;
* **hooks** are host programs: the host runs them around the VM, never the guest; except
  ``startContainer``, which runs in the container's namespaces (kept: crun runs it);
* **AppArmor/SELinux labels** name host profiles the guest kernel does not have (not enforced:
  the VM is the isolation boundary);
* **devices** are host device numbers: crun creates the standard set (null, zero, full, tty,
  random, urandom) itself; passed-through devices arrive as ``Device`` entries of the request;
* cgroup v1 only settings (``linux.resources.network``), ``linux.intelRdt`` and the seccomp
  ``listenerPath`` (a host socket) are dropped.

``linux.cgroupsPath`` is set to ``/cocoon/<id>``, so the agent finds the container's cgroup.
``ociVersion`` above what the guest's crun (1.8) accepts (1.1) is lowered to 1.1.0: crun refuses
unknown versions outright, and the 1.2 additions it does not know are ignored.
Each function returns the adjusted copy and human-readable notes of what was dropped (logged).
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

from cocoon.errors import InvalidArgument

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
SHARED_WITH_VM = frozenset({"ipc", "uts"})
GUEST_OCI_VERSION = "1.1.0"  # the newest runtime-spec version the guest's crun 1.8 accepts
_PROCESS_LABELS = ("apparmorProfile", "selinuxLabel")


def check_id(value: str, what: str = "container id") -> str:
    """Container and exec ids go into guest paths: a whitelist, checked before any path is built."""
    if not ID_RE.match(value):
        raise InvalidArgument(f"bad {what}", field=what.replace(" ", "_"), value=value[:80],
                              allowed="[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
    return value


def load_json_object(data: bytes | str, what: str) -> dict[str, Any]:
    """Parse a JSON object the host sent (InvalidArgument naming ``what`` otherwise)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON", error=str(exc)) from exc
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{what} must be a JSON object", got=type(obj).__name__)
    return obj


def adjust_process(process: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """An OCI process (the init's or an exec's) as the guest runs it."""
    out = copy.deepcopy(process)
    notes = []
    for key in _PROCESS_LABELS:
        if out.pop(key, None):
            notes.append(f"process.{key} not enforced in the guest")
    args = out.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument("process.args must be a non-empty list of strings", field="process.args")
    return out, notes


def adjust_spec(spec: dict[str, Any], container_id: str, cgroups_path: str) -> tuple[dict[str, Any], list[str]]:
    """The host-sent config.json -> the guest's config.json, and notes on what was dropped."""
    out = copy.deepcopy(spec)
    notes: list[str] = []
    root = out.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) or not root["path"].startswith("/"):
        raise InvalidArgument("root.path must be an absolute guest path", field="root.path",
                              container=container_id)
    if os.path.normpath(root["path"]) == "/":
        raise InvalidArgument("root.path must not be the guest's root", field="root.path", container=container_id)
    process = out.get("process")
    if not isinstance(process, dict):
        raise InvalidArgument("the spec has no process", field="process", container=container_id)
    version = out.get("ociVersion")
    if not isinstance(version, str) or _major_minor(version) > _major_minor(GUEST_OCI_VERSION):
        notes.append(f"ociVersion {version} lowered to {GUEST_OCI_VERSION} for the guest's crun")
        out["ociVersion"] = GUEST_OCI_VERSION
    out["process"], pnotes = adjust_process(process)
    notes += pnotes
    hooks = out.pop("hooks", None)
    if isinstance(hooks, dict):
        host_kinds = sorted(k for k, v in hooks.items() if v and k != "startContainer")
        if host_kinds:
            notes.append(f"hooks {', '.join(host_kinds)} dropped: they run on the host")
        if hooks.get("startContainer"):
            out["hooks"] = {"startContainer": hooks["startContainer"]}
    elif hooks:
        raise InvalidArgument("hooks must be an object", field="hooks", container=container_id)
    linux = out.setdefault("linux", {})
    if not isinstance(linux, dict):
        raise InvalidArgument("linux must be an object", field="linux", container=container_id)
    linux["cgroupsPath"] = cgroups_path
    linux["namespaces"] = _namespaces(linux.get("namespaces") or [], notes)
    if linux.pop("mountLabel", None):
        notes.append("linux.mountLabel not enforced in the guest")
    if linux.pop("devices", None):
        notes.append("linux.devices dropped: host device numbers mean nothing in the guest")
    if linux.pop("intelRdt", None):
        notes.append("linux.intelRdt dropped")
    resources = linux.get("resources")
    if isinstance(resources, dict) and resources.pop("network", None):
        notes.append("linux.resources.network dropped (cgroup v1 only)")
    seccomp = linux.get("seccomp")
    if isinstance(seccomp, dict):
        for key in ("listenerPath", "listenerMetadata"):
            if seccomp.pop(key, None):
                notes.append(f"linux.seccomp.{key} dropped: it names a host socket")
    return out, notes


def take_vm_sysctls(spec: dict[str, Any]) -> dict[str, str]:
    """Remove the ``net.*`` sysctls from ``spec`` and return them: the container has no network
    namespace of its own in the guest (it uses the VM's, which belongs to its pod), so crun would
    refuse them; the agent applies them to the VM instead."""
    linux = spec.get("linux")
    sysctl = linux.get("sysctl") if isinstance(linux, dict) else None
    if not isinstance(sysctl, dict):
        return {}
    taken = {k: str(v) for k, v in sysctl.items() if isinstance(k, str) and k.startswith("net.")}
    for key in taken:
        del sysctl[key]
    return taken


def _major_minor(version: str) -> tuple[int, int]:
    parts = re.findall(r"\d+", version)[:2]
    if len(parts) < 2:
        return (99, 99)  # unparsable: treat as too new
    return int(parts[0]), int(parts[1])


def _namespaces(entries: list[Any], notes: list[str]) -> list[dict[str, Any]]:
    out = []
    for ns in entries:
        if not isinstance(ns, dict):
            raise InvalidArgument("linux.namespaces entries must be objects", field="linux.namespaces")
        kind = ns.get("type")
        if kind == "network":
            notes.append("network namespace dropped: the container uses the VM's network")
            continue
        if ns.get("path"):
            if kind in SHARED_WITH_VM:
                notes.append(f"{kind} namespace path dropped: shares the VM's")
                continue
            notes.append(f"{kind} namespace path dropped: a new namespace instead")
        out.append({k: v for k, v in ns.items() if k != "path"})
    return out


def device_entry(container_path: str, vm_path: str, st_mode: int, st_rdev: int) -> dict[str, Any]:
    """A ``linux.devices`` entry for a device the host passed into the VM (seen at ``vm_path``)."""
    import stat as stat_mod

    if stat_mod.S_ISBLK(st_mode):
        kind = "b"
    elif stat_mod.S_ISCHR(st_mode):
        kind = "c"
    else:
        raise InvalidArgument("not a device node", field="devices", vm_path=vm_path)
    return {"path": container_path, "type": kind, "major": os.major(st_rdev), "minor": os.minor(st_rdev),
            "fileMode": stat_mod.S_IMODE(st_mode), "uid": 0, "gid": 0}


def with_devices(spec: dict[str, Any], devices: list[dict[str, Any]]) -> dict[str, Any]:
    """``spec`` plus device entries (from :func:`device_entry`) and the cgroup rules allowing them."""
    if not devices:
        return spec
    linux = spec.setdefault("linux", {})
    linux.setdefault("devices", []).extend(devices)
    rules = linux.setdefault("resources", {}).setdefault("devices", [])
    for d in devices:
        rules.append({"allow": True, "type": d["type"], "major": d["major"], "minor": d["minor"], "access": "rwm"})
    return spec
