"""Build the real guest image and boot it with QEMU (TCG is fine) to the bare and agent markers.

Skips with a reason when QEMU, the Debian cloud kernel or busybox/python3.11 are missing. Each
boot has a deadline; teardown asserts no QEMU process of ours is left.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cocoon.image import Image, build_image
from cocoon.util.proc import spawn

pytestmark = pytest.mark.vm

QEMU = "qemu-system-x86_64"
BARE_MARKER = "COCOON-BARE-READY"
AGENT_MARKER = "COCOON-AGENT-READY"
FAST_PARAMS = (
    "reboot=k panic=-1 tsc=reliable no_timer_check rcupdate.rcu_expedited=1 "
    "cryptomgr.notests mitigations=off nokaslr quiet"
)


def host_tsc_khz() -> int | None:
    """The host's TSC rate: microvm under TCG may hang calibrating it without tsc_early_khz."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    return int(float(m.group(1)) * 1000) if m else None


@dataclass
class BootResult:
    seconds: float | None  # from starting qemu to the marker; None if it never came
    console: str
    exit_code: int | None


def qemu_argv(
    kernel: Path,
    initrd: Path,
    append: str,
    *,
    machine: str = "microvm",
    serial_port: Path | None = None,
    memory: int = 256,
) -> list[str]:
    """A QEMU command line for a quick TCG boot on the serial console."""
    m = "microvm,x-option-roms=off,isa-serial=on,rtc=on" if machine == "microvm" else machine
    argv = [
        QEMU,
        "-M",
        m,
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        str(memory),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        append,
    ]
    if serial_port is not None:
        argv += ["-chardev", f"socket,id=agent,path={serial_port},server=on,wait=off"]
        if machine == "microvm":
            argv += ["-global", "virtio-mmio.force-legacy=false", "-device", "virtio-serial-device"]
        else:
            argv += ["-device", "virtio-serial-pci"]
        argv += ["-device", "virtserialport,chardev=agent,name=cocoon.agent"]
    return argv


def kernel_params(extra: str = "") -> str:
    khz = host_tsc_khz()
    tsc = f" tsc_early_khz={khz}" if khz else ""
    return f"console=ttyS0 {FAST_PARAMS}{tsc} {extra}".strip()


def boot(argv: list[str], marker: str, timeout: float = 60.0) -> BootResult:
    """Run QEMU until it exits (the guest powers off) or ``timeout``; time the marker line."""
    lines: list[str] = []
    seen: float | None = None
    t0 = time.monotonic()
    with spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, grace=1.0) as proc:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), True)
        deadline = t0 + timeout
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode(errors="replace").rstrip("\r")
                lines.append(line)
                if seen is None and marker in line:
                    seen = time.monotonic() - t0
        sel.close()
        try:
            code: int | None = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
    return BootResult(seen, "\n".join(lines), code)


def our_qemus() -> list[int]:
    """PIDs of qemu processes that are children of this test process."""
    me = str(os.getpid())
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if "qemu" in stat.split(")")[0] and fields[1] == me:
            out.append(int(d.name))
    return out


@pytest.fixture(scope="module")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed (apt-get install qemu-system-x86)")
    if not list(Path("/boot").glob("vmlinuz-*-cloud-amd64")):
        pytest.skip("no Debian cloud kernel (apt-get install linux-image-cloud-amd64)")
    for tool in ("/bin/busybox", "/usr/bin/python3.11", "/usr/bin/crun"):
        if not Path(tool).exists():
            pytest.skip(f"{tool} missing (apt-get install busybox-static python3-minimal crun)")
    t0 = time.monotonic()
    img = build_image(cache_dir=tmp_path_factory.mktemp("images"))
    assert time.monotonic() - t0 < 60, "image build must take well under a minute"
    yield img
    assert our_qemus() == [], "qemu left running"


def _check(result: BootResult, marker: str) -> None:
    assert result.seconds is not None, f"no {marker} on the console:\n" + result.console[-3000:]


def test_bare_marker_vmlinux(built_image: Image, no_leaks: None) -> None:
    assert built_image.vmlinux is not None, "vmlinux extraction failed (lz4 tool missing?)"
    r = boot(qemu_argv(built_image.vmlinux, built_image.initrd, kernel_params("rdinit=/sbin/bare-init")),
             BARE_MARKER)
    _check(r, BARE_MARKER)
    assert r.exit_code == 0, "guest did not power off"


def test_bare_marker_bzimage(built_image: Image, no_leaks: None) -> None:
    r = boot(qemu_argv(built_image.bzimage, built_image.initrd, kernel_params("rdinit=/sbin/bare-init")),
             BARE_MARKER)
    _check(r, BARE_MARKER)


def test_agent_probe_marker_with_serial_port(built_image: Image, tmp_path: Path, no_leaks: None) -> None:
    """The python init mounts, loads every listed module and sees the virtio-serial port."""
    r = boot(qemu_argv(built_image.kernel, built_image.initrd, kernel_params("rdinit=/sbin/probe-init"),
                       serial_port=tmp_path / "agent.sock"), AGENT_MARKER)
    _check(r, AGENT_MARKER)
    tail = r.console[-3000:]
    assert '"level":"error"' not in r.console, tail
    assert '"msg":"modules"' in r.console and '"failed":0' in r.console, tail
    assert "cocoon.agent=/dev/vport" in r.console, tail
    assert '"protobuf":"upb"' in r.console, tail
    # / is a bind of the initramfs with a parent, so crun in the guest can pivot_root(2).
    assert '"root_attached":true' in r.console, tail
    assert r.exit_code == 0
