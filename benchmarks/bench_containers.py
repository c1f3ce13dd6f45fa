"""create+start+wait+delete of a hello container, and `state`/`list` latency: cocoon vs its peers.

Peers, run side by side in this one run on the same busybox bundle: runc, crun (cgroups disabled: host
crun refuses this host's hybrid cgroup layout), runsc (gVisor, systrap) where installed, and a bare QEMU
boot of our kernel + initrd to a marker (the floor for anything that boots a VM here).

    .venv/bin/python benchmarks/bench_containers.py [--runs 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, pss_kib, table

from cocoon import config
from cocoon.api.bundle import make_bundle

COCOON = [sys.executable, "-m", "cocoon.cli.main"]


def timed(argv: list[str], **kw: object) -> float:
    t = time.monotonic()
    out = subprocess.run(argv, capture_output=True, timeout=300, check=False, **kw)  # type: ignore[call-overload]
    if out.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({out.returncode}): {out.stderr.decode()[-400:]}")
    return time.monotonic() - t


def lifecycle(runtime: list[str], root: Path, bundle: Path, cid: str, env: dict[str, str] | None = None) -> float:
    """create + start + wait for exit + delete, as containerd would drive it (run = all of it)."""
    return timed([*runtime, "--root", str(root), "run", "--bundle", str(bundle), cid], stdin=subprocess.DEVNULL,
                 env=env)  # fmt: skip


def template_env(tmp: Path, on: bool = True) -> dict[str, str]:
    """cocoon's environment with VM templates on (their own directory, removed by the caller) or off."""
    conf = tmp / f"template-{'on' if on else 'off'}.toml"
    conf.write_text(f'[factory]\ntemplate = {"true" if on else "false"}\ntemplate_dir = "{TEMPLATE_DIR}"\n')
    return {**os.environ, "COCOON_CONFIG": str(conf)}


TEMPLATE_DIR = f"/dev/shm/cocoon-bench-templates-{os.getpid()}"


def peers(tmp: Path) -> dict[str, tuple[list[str], dict[str, str] | None]]:
    found: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "cocoon": (COCOON, template_env(tmp, on=False)), "cocoon (template)": (COCOON, template_env(tmp))}  # fmt: skip
    if shutil.which("runc"):
        found["runc"] = (["runc"], None)
    if shutil.which("crun"):
        found["crun"] = (["crun", "--cgroup-manager=disabled"], None)
    if shutil.which("runsc"):
        found["runsc"] = (["runsc", "--network=none", "--ignore-cgroups"], None)
    return found


def bare_qemu(runs: int) -> list[float]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_boot import bare_boot

    from cocoon.api.guest import GuestVM

    cfg = config.load()
    guest = GuestVM(cfg, "bench-bare", Path(tempfile.mkdtemp()))
    import asyncio

    spec = asyncio.run(guest.vm_spec())
    return [bare_boot(dataclasses.replace(spec, workdir=Path(tempfile.mkdtemp()))) for _ in range(runs)]


def latency(runtime: list[str], root: Path, args: list[str], n: int = 20) -> float:
    return median([timed([*runtime, "--root", str(root), *args]) for _ in range(n)])


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (by /proc/*/stat parent links)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def idle_memory(tmp: Path, name: str, env: dict[str, str] | None = None) -> tuple[float, int]:
    """PSS (MiB) of every host process of one idle running cocoon container, and how many there are."""
    root = tmp / f"root-mem-{name}"
    bundle = make_bundle(tmp / f"bundle-mem-{name}", ["sleep", "600"])
    pid_file = tmp / f"mem-{name}.pid"
    subprocess.run([*COCOON, "--root", str(root), "run", "-d", "--bundle", str(bundle), "--pid-file", str(pid_file),
                    "mem"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                   check=True, timeout=300, env=env)  # fmt: skip
    try:
        time.sleep(3)
        procs = _descendants(int(pid_file.read_text()))
        total = sum(pss_kib(p) for p in procs if Path(f"/proc/{p}").exists())
        return total / 1024, len(procs)
    finally:
        subprocess.run([*COCOON, "--root", str(root), "delete", "--force", "mem"], capture_output=True, check=False,
                       timeout=120, env=env)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    rows = []
    lat_rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ctr-") as tmp_s:
        tmp = Path(tmp_s)
        bundle = make_bundle(tmp / "bundle", ["echo", "hello"])
        results: dict[str, float] = {}
        for name, (argv, env) in peers(tmp).items():
            root = tmp / f"root-{name.split()[0]}"
            try:
                if name == "cocoon (template)":  # the first run builds the template: not counted
                    lifecycle(argv, root, bundle, "warm", env)
                times = [lifecycle(argv, root, bundle, f"b{i}", env) for i in range(args.runs)]
            except SystemExit as exc:
                rows.append([name, "failed", str(exc)[:60], ""])
                continue
            results[name] = median(times)
            # state/list latency on a root holding one (stopped or created) container
            if name in ("cocoon", "runc"):
                # The container keeps create's stdio (as with runc): give it /dev/null, not pipes.
                subprocess.run([*argv, "--root", str(root), "create", "--bundle", str(bundle), "lat"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                               stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
                lat_rows.append([name, f"{latency(argv, root, ['state', 'lat']) * 1000:.1f}",
                                 f"{latency(argv, root, ['list']) * 1000:.1f}"])  # fmt: skip
                subprocess.run([*argv, "--root", str(root), "delete", "--force", "lat"], capture_output=True,
                               check=False, timeout=120)  # fmt: skip
        results["bare QEMU boot"] = median(bare_qemu(args.runs))
        memory = {"cocoon": idle_memory(tmp, "cold", template_env(tmp, on=False)),
                  "cocoon (template)": idle_memory(tmp, "tpl", template_env(tmp))}
    shutil.rmtree(TEMPLATE_DIR, ignore_errors=True)
    base, tpl = results.get("cocoon", 0.0), results.get("cocoon (template)", 0.0)
    for name, value in results.items():
        rows.append([name, f"{value:.3f}", f"{base / value:.2f}x" if value else "-",
                     f"{tpl / value:.2f}x" if value else "-"])  # fmt: skip
    print(table(f"hello container: run (create+start+wait+delete), median of {args.runs}",
                ["runtime", "seconds", "cocoon / this", "cocoon (template) / this"], rows))  # fmt: skip
    print()
    print(table("CLI latency, median of 20 (ms)", ["runtime", "state", "list"], lat_rows))
    print()
    for name, (mem_mib, nprocs) in memory.items():
        print(f"idle running container, {name}: {mem_mib:.1f} MiB PSS over {nprocs} host processes "
              f"(monitor, QEMU, virtiofsd; guest RAM {config.load().hypervisor.qemu.memory_mib} MiB)")


if __name__ == "__main__":
    os.environ.setdefault("COCOON_CONFIG", "")
    main()
