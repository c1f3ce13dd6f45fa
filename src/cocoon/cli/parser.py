"""Argument definitions only (like youki's liboci-cli): no logic, no heavy imports."""

from __future__ import annotations

import argparse

from cocoon import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cocoon",
        description="Cocoon: an OCI runtime that runs every container in its own lightweight VM.",
    )
    p.add_argument("--version", "-v", action="version", version=f"cocoon version {__version__}")
    p.add_argument("--root", default=None, help="state directory (default /run/cocoon)")
    p.add_argument("--log", default=None, help="append log lines to this file (runc compatible)")
    p.add_argument("--log-format", default=None, choices=["text", "json", "logfmt"], help="log line format")
    p.add_argument("--debug", action="store_true", help="log at debug level")
    p.add_argument("--config", default=None, help="configuration file (default $COCOON_CONFIG or /etc/cocoon/...)")
    p.add_argument("--systemd-cgroup", action="store_true", help="accepted for runc compatibility (no effect)")
    p.add_argument("--rootless", default=None, help="accepted for runc compatibility (no effect)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sub.add_parser("version", help="print version information")

    c = sub.add_parser("check", help="tell whether this host can run Cocoon, and how")
    c.add_argument("--json", action="store_true", help="machine-readable output")

    e = sub.add_parser("env", help="print the effective configuration and what was detected")
    e.add_argument("--json", action="store_true", help="machine-readable output")

    img = sub.add_parser("image", help="manage the guest image")
    img_sub = img.add_subparsers(dest="image_command", metavar="ACTION")
    img_sub.required = True
    b = img_sub.add_parser("build", help="build (or find cached) guest kernel + initrd")
    b.add_argument("--force", action="store_true", help="rebuild even when the cache is current")
    b.add_argument("--json", action="store_true", help="machine-readable output")

    d = sub.add_parser("demo", help="boot a VM and print what its guest agent reports")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    return p
