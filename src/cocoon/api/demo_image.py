"""A busybox container image made locally (no registry): for the demo, the tests and the benchmarks.

``umoci`` builds an OCI layout whose root holds the host's static busybox (see
:func:`cocoon.api.bundle.find_busybox`), ``skopeo`` exports each tag as a docker-archive tarball
that ``ctr image import``, ``podman load`` and ``docker load`` take.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from cocoon.api.bundle import APPLETS, find_busybox
from cocoon.util.proc import run

#: Tag name in the layout -> the image's command.
PAUSE_CMD = ("/bin/sleep", "infinity")


def make_layout(work: Path) -> Path:
    """An OCI layout ``<work>/oci`` with tag ``latest``: busybox, ``sh`` as command, PATH=/bin."""
    layout, unpacked = work / "oci", work / "unpacked"
    work.mkdir(parents=True, exist_ok=True)
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:latest"])
    run(["umoci", "unpack", "--image", f"{layout}:latest", str(unpacked)])
    rootfs = unpacked / "rootfs"
    for sub in ("bin", "proc", "sys", "dev", "etc", "tmp", "root"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(find_busybox(), rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    run(["umoci", "repack", "--image", f"{layout}:latest", str(unpacked)])
    run(["umoci", "config", "--image", f"{layout}:latest", "--config.cmd", "sh", "--config.env", "PATH=/bin",
         "--config.workingdir", "/"])  # fmt: skip
    shutil.rmtree(unpacked, ignore_errors=True)
    return layout


def export(layout: Path, tag: str, name: str, out: Path, cmd: Sequence[str] = ()) -> Path:
    """``<layout>:<tag>`` (re-tagged from ``latest`` with ``cmd`` if given) as a docker-archive named ``name``."""
    if cmd:
        argv = ["umoci", "config", "--image", f"{layout}:latest", "--tag", tag]
        for word in cmd:
            argv += ["--config.cmd", word]
        run(argv)
    run(["skopeo", "copy", f"oci:{layout}:{tag}", f"docker-archive:{out}:{name}"], timeout=300)
    return out
