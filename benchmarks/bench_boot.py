"""Boot to agent-ready and idle memory: cocoon vs a bare QEMU boot of the same kernel + initrd.

The peer is the physical limit on this host: the same QEMU command line, kernel and initrd, but with
`rdinit=/sbin/bare-init`, a trivial init that prints a marker and powers off. Cocoon's figure is the time
from launching QEMU to the agent's first Check answer.

    .venv/bin/python benchmarks/bench_boot.py [--runs 10]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, pss_kib, rss_kib, table

from cocoon import config
from cocoon.api.guest import GuestVM
from cocoon.hypervisors.base import VMSpec
from cocoon.hypervisors.qemu import build_argv
from cocoon.util import proc

MARKER = b"COCOON-BARE-READY"


def bare_boot(spec: VMSpec) -> float:
    """Seconds from launching QEMU to the bare init's marker on the console."""
    spec = dataclasses.replace(spec, kernel_params=(*spec.kernel_params, "rdinit=/sbin/bare-init"))
    spec.workdir.mkdir(parents=True, exist_ok=True)
    console = spec.workdir / "console.log"
    console.unlink(missing_ok=True)
    started = time.monotonic()
    with proc.spawn(build_argv(spec)) as p:
        while True:
            if console.exists() and MARKER in console.read_bytes():
                elapsed = time.monotonic() - started
                break
            if p.poll() is not None:
                raise SystemExit(f"bare boot failed: qemu exited {p.returncode}")
            if time.monotonic() - started > 60:
                raise SystemExit("bare boot timed out")
            time.sleep(0.002)
        p.wait(timeout=10)
    return elapsed


async def cocoon_boot(cfg: config.Config, workdir: Path) -> tuple[float, VMSpec, int, int]:
    async with GuestVM(cfg, "bench", workdir) as guest:
        assert guest.times is not None and guest.vm is not None and guest.vm.pid is not None
        await asyncio.sleep(1.0)  # idle: let the guest settle before reading memory
        pid = guest.vm.pid
        return guest.times.agent_ready, guest.vm.spec, pss_kib(pid), rss_kib(pid)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    loaded = config.load()
    cfg = dataclasses.replace(loaded, factory=dataclasses.replace(loaded.factory, template=False))  # cold boots
    template_dir = Path(f"/dev/shm/cocoon-bench-boot-{os.getpid()}")
    tcfg = dataclasses.replace(cfg, factory=dataclasses.replace(cfg.factory, template=True,
                                                                template_dir=str(template_dir)))  # fmt: skip
    restored: list[float] = []
    tpss: list[int] = []
    ours: list[float] = []
    bare: list[float] = []
    pss: list[int] = []
    rss: list[int] = []
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as tmp:
        for i in range(args.runs):
            wd = Path(tmp) / f"c{i}"
            t, spec, p_kib, r_kib = asyncio.run(cocoon_boot(cfg, wd))
            ours.append(t)
            pss.append(p_kib)
            rss.append(r_kib)
            bare.append(bare_boot(dataclasses.replace(spec, workdir=Path(tmp) / f"b{i}")))
        try:
            asyncio.run(cocoon_boot(tcfg, Path(tmp) / "template-warm"))  # builds the template: not counted
            for i in range(args.runs):
                t, _, p_kib, _ = asyncio.run(cocoon_boot(tcfg, Path(tmp) / f"t{i}"))
                restored.append(t)
                tpss.append(p_kib)
        finally:
            shutil.rmtree(template_dir, ignore_errors=True)
    accel = spec.accel
    rows = [
        [
            "boot to ready (median s)",
            f"{median(ours):.3f}",
            f"{median(bare):.3f}",
            f"{median(ours) / median(bare):.2f}x",
        ],
        ["boot to ready (min s)", f"{min(ours):.3f}", f"{min(bare):.3f}", f"{min(ours) / min(bare):.2f}x"],
        ["restored from a template, to ready (median s)", f"{median(restored):.3f}", f"{median(bare):.3f}",
         f"{median(restored) / median(bare):.2f}x"],
    ]
    print(
        table(
            f"Boot, {args.runs} runs each, accel={accel}, guest RAM {spec.memory_mib} MiB",
            ["metric", "cocoon (agent Check)", "bare QEMU (marker)", "ratio"],
            rows,
        )
    )
    print()
    print(
        table(
            "Idle VM host memory (QEMU process)",
            ["metric", "value"],
            [
                ["PSS median (MiB)", f"{median(pss) / 1024:.1f}"],
                ["PSS median, restored from a template (MiB)", f"{median(tpss) / 1024:.1f}"],
                ["RSS median (MiB)", f"{median(rss) / 1024:.1f}"],
                ["guest RAM size (MiB)", str(spec.memory_mib)],
            ],
        )
    )


if __name__ == "__main__":
    main()
