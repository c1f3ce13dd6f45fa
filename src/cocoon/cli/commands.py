"""CLI adapters: each `cmd_<name>` turns parsed arguments into one library call and prints.

No logic lives here; heavy modules are imported inside each function so a command
pays only for what it uses.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from cocoon.api.guest import demo_report

    report = asyncio.run(demo_report(_config(args)))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for key, value in report.items():
            print(f"{key:18} {value}")
    sys.stdout.flush()
    return 0
