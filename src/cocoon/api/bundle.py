"""A small OCI bundle made locally from busybox-static: the built-in demo and test workload.

No registry is needed: the rootfs is the host's /bin/busybox (Debian's busybox-static)
plus one symlink per applet, and config.json is the default spec with the given args.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cocoon.errors import NotFound
from cocoon.oci.spec import default_spec

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
APPLETS = (
    "sh", "echo", "cat", "ls", "sleep", "id", "hostname", "uname", "env", "true", "false", "ps", "mount",
    "head", "tail", "wc", "grep", "printf", "yes", "dd", "date", "kill", "pwd", "mkdir", "rm", "touch", "seq",
    "ping", "ping6", "nc", "ip", "wget", "sed",
)  # fmt: skip


def find_busybox() -> Path:
    for path in BUSYBOX_CANDIDATES:
        if os.path.isfile(path):
            return Path(path)
    raise NotFound("busybox not found", path=",".join(BUSYBOX_CANDIDATES), fix="apt-get install busybox-static")


def make_bundle(
    directory: str | os.PathLike[str], args: list[str], *, terminal: bool = False, env: list[str] | None = None
) -> Path:
    """Write a busybox bundle at ``directory`` running ``args``; returns the bundle path."""
    bundle = Path(directory)
    rootfs = bundle / "rootfs"
    for sub in ("bin", "proc", "sys", "dev", "etc", "tmp", "root"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(find_busybox(), rootfs / "bin" / "busybox")
    for applet in APPLETS:
        link = rootfs / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    spec = default_spec()
    # 1.0.2 is what runc 1.1 writes; older peers (crun 1.8 on Debian 12) refuse 1.2.x.
    spec["ociVersion"] = "1.0.2"
    spec["process"]["args"] = list(args)
    spec["process"]["terminal"] = terminal
    if env:
        spec["process"]["env"] = [*spec["process"]["env"], *env]
    spec["root"]["readonly"] = False
    spec["hostname"] = "cocoon-demo"
    (bundle / "config.json").write_text(json.dumps(spec, indent=2))
    return bundle
