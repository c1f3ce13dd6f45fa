"""CLI adapters: each `cmd_<name>` turns parsed arguments into one library call and prints.

No logic lives here; heavy modules are imported inside each function so a command
pays only for what it uses.
"""

from __future__ import annotations

import json
import sys

# `typing` (~4 ms) and argparse (~10 ms with what it pulls in) stay out of `cocoon state`'s path.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


def _config(args: argparse.Namespace) -> Any:
    from cocoon import config

    cfg = config.load(args.config)
    if args.root:
        import dataclasses

        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, root=args.root))
    return cfg


def cmd_version(args: argparse.Namespace) -> int:
    from cocoon import __version__

    print(f"cocoon version {__version__}")
    print("spec: 1.0.2")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from cocoon.check import Status, run_checks

    results = run_checks(_config(args))
    if args.json:
        print(json.dumps([{**r.__dict__, "status": str(r.status)} for r in results], indent=2))
    else:
        for r in results:
            print(f"{r.status.value.upper():4}  {r.name:12} {r.detail}")
            if r.fix and r.status != Status.OK:
                print(f"{'':18}fix: {r.fix}")
    failed = [r for r in results if r.status == Status.FAIL]
    if not args.json:
        print(
            "\ncocoon can run on this host"
            if not failed
            else f"\ncocoon cannot run here: {len(failed)} check(s) failed"
        )
    return 1 if failed else 0


def cmd_env(args: argparse.Namespace) -> int:
    from cocoon.api.env import environment

    env = environment(_config(args))
    if args.json:
        print(json.dumps(env, indent=2, default=str))
    else:
        _print_tree(env)
    return 0


def _print_tree(data: dict[str, Any], indent: int = 0) -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            print(f"{'  ' * indent}[{key}]")
            _print_tree(value, indent + 1)
        else:
            print(f"{'  ' * indent}{key} = {json.dumps(value, default=str)}")


def cmd_image(args: argparse.Namespace) -> int:
    from cocoon.image import build_for_config

    image = build_for_config(_config(args), force=args.force)
    if args.json:
        print(json.dumps(image.to_dict(), indent=2, default=str))
    else:
        print(f"kernel: {image.kernel}")
        print(f"initrd: {image.initrd} ({image.size_bytes / 1e6:.1f} MB)")
        print(f"hash:   {image.hash}{' (cached)' if image.cached else ''}")
    return 0


def cmd_factory(args: argparse.Namespace) -> int:
    import asyncio

    from cocoon.api import factory

    cfg = _config(args)
    if args.factory_command == "init":
        template = asyncio.run(factory.init_default(cfg, memory_mib=args.memory_mib, vcpus=args.vcpus))
        meta = template.meta
        print(f"template {meta['key']}: {meta['memory_mib']} MiB, {meta['vcpus']} vCPU, {meta['accel']}, "
              f"{meta['ram_bytes'] / 2**20:.0f} MiB of RAM saved in {template.directory}")  # fmt: skip
        if not cfg.factory.template:
            print("note: [factory] template is off: sandboxes will not use it")
    elif args.factory_command == "status":
        found = factory.list_templates(cfg)
        if args.json:
            print(json.dumps({"enabled": cfg.factory.template, "templates": found}, indent=2))
        else:
            print(f"templates {'on' if cfg.factory.template else 'off'} ({cfg.factory.template_dir})")
            for meta in found:
                print(f"  {meta['key']}  {meta['memory_mib']} MiB  {meta['vcpus']} vCPU  {meta['accel']}  "
                      f"{meta['ram_bytes'] / 2**20:.0f} MiB RAM  built in {meta['boot_seconds']} s")  # fmt: skip
    else:
        for key in factory.destroy_templates(cfg):
            print(f"removed {key}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    if not args.vm_only:
        from cocoon.api.demo import run_demo

        return run_demo(_config(args))
    from cocoon.api.guest import demo_report

    report = asyncio.run(demo_report(_config(args)))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for key, value in report.items():
            print(f"{key:18} {value}")
    sys.stdout.flush()
    return 0


# -- runc-compatible commands ---------------------------------------------------------------------
def cmd_create(args: argparse.Namespace) -> int:
    from cocoon.api import container

    container.refuse_preserved_fds(args.preserve_fds)
    container.create(_config(args), args.id, args.bundle, console_socket=args.console_socket, pid_file=args.pid_file)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from cocoon.api import container

    container.refuse_preserved_fds(args.preserve_fds)
    return container.run(
        _config(args), args.id, args.bundle, console_socket=args.console_socket, pid_file=args.pid_file,
        detach=args.detach,
    )  # fmt: skip


def cmd_start(args: argparse.Namespace) -> int:
    from cocoon.api import container

    container.start(_config(args), args.id)
    return 0


def _root(args: argparse.Namespace) -> str:
    """The state root; with --root (what runc clients pass) no configuration is read at all."""
    return str(args.root) if args.root else str(_config(args).runtime.root)


def cmd_state(args: argparse.Namespace) -> int:
    from cocoon.api.ids import validate_id
    from cocoon.api.state import StateStore, refresh_status

    state = refresh_status(StateStore(_root(args)).load(validate_id(args.id)))
    print(json.dumps(state.to_oci_state(), indent=2))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    from cocoon.api import container

    container.kill(_config(args), args.id, args.signal, all_processes=args.all)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from cocoon.api import container

    container.delete(_config(args), args.id, force=args.force)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from cocoon.api.state import StateStore, refresh_status

    states = [refresh_status(s) for s in StateStore(_root(args)).list()]
    if args.quiet:
        for s in states:
            print(s.id)
    elif args.format == "json":
        print(json.dumps([s.to_list_entry() for s in states]))
    else:
        rows = [["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]]
        for s in states:
            e = s.to_list_entry()
            rows.append([e["id"], str(e["pid"]), e["status"], e["bundle"], e["created"], e["owner"]])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    from cocoon.api import container

    cfg = _config(args)
    if args.format == "json":  # runc's shape: host pids (containerd's Pids); the monitor stands for them
        print(json.dumps(container.processes(cfg, args.id)))
        return 0
    # The table is the guest's view: its pids mean nothing on the host (docs/containers.md).
    print(f"{'UID':>5} {'PID':>6} {'PPID':>6} STAT CMD")
    for p in container.guest_processes(cfg, args.id):
        print(f"{p.uid:>5} {p.pid:>6} {p.ppid:>6} {p.state:<4} {p.command}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    from cocoon.api import container

    container.pause(_config(args), args.id)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from cocoon.api import container

    container.resume(_config(args), args.id)
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    import os

    from cocoon.errors import AlreadyExists
    from cocoon.oci.spec import default_spec

    path = os.path.join(args.bundle, "config.json")
    if os.path.exists(path):
        raise AlreadyExists("File config.json exists. Remove it first", path=path)
    with open(path, "w") as fh:
        json.dump(default_spec(rootless=args.rootless), fh, indent=2)
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from cocoon.oci.spec import features

    print(json.dumps(features(), indent=2))
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from cocoon.api.container import refuse_preserved_fds
    from cocoon.api.execution import exec_process

    refuse_preserved_fds(args.preserve_fds)
    command = args.exec_args[1:] if args.exec_args[:1] == ["--"] else args.exec_args
    return exec_process(
        _config(args), args.id, detach=args.detach, pid_file=args.pid_file, console_socket=args.console_socket,
        process_file=args.process, args=command, tty=args.tty, cwd=args.cwd, env=args.env, user=args.user,
    )  # fmt: skip


def cmd_update(args: argparse.Namespace) -> int:
    from cocoon.api import resources

    res = resources.resources_from_flags(
        resources_file=args.resources, memory=args.memory, memory_swap=args.memory_swap,
        memory_reservation=args.memory_reservation, cpu_shares=args.cpu_shares, cpu_quota=args.cpu_quota,
        cpu_period=args.cpu_period, cpuset_cpus=args.cpuset_cpus, cpuset_mems=args.cpuset_mems,
        pids_limit=args.pids_limit,
    )  # fmt: skip
    resources.update(_config(args), args.id, res)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from cocoon.api import resources
    from cocoon.errors import InvalidArgument

    text = args.interval.strip()
    try:
        interval = float(text[:-2]) / 1000 if text.endswith("ms") else float(text.rstrip("s"))
    except ValueError:
        raise InvalidArgument(f"invalid interval {args.interval!r}", field="interval") from None
    if interval <= 0:
        raise InvalidArgument("interval must be positive", field="interval")
    resources.events(_config(args), args.id, stats_once=args.stats, interval=interval)
    return 0


def cmd_network(args: argparse.Namespace) -> int:
    from cocoon.api.netinfo import sandbox_network

    net = sandbox_network(_config(args), args.id)
    print(json.dumps(net.to_dict(), indent=2) if args.format == "json" else net.to_table())
    return 0
