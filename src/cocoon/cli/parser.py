"""Argument definitions only (like youki's liboci-cli): no logic, no heavy imports."""

from __future__ import annotations

import argparse

from cocoon import __version__

PRESERVE_FDS_HELP = "refused if any of fds 3..3+N-1 is open: host fds cannot enter the VM"


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

    fac = sub.add_parser("factory", help="VM templates: sandboxes start by restoring one ([factory] template)")
    fac_sub = fac.add_subparsers(dest="factory_command", metavar="ACTION")
    fac_sub.required = True
    fin = fac_sub.add_parser("init", help="build the template for a guest size now (else the first sandbox does)")
    fin.add_argument("--memory-mib", type=int, default=0, help="guest memory (default: [hypervisor.qemu])")
    fin.add_argument("--vcpus", type=int, default=0, help="guest vCPUs (default: [hypervisor.qemu])")
    fst = fac_sub.add_parser("status", help="list the saved templates")
    fst.add_argument("--json", action="store_true", help="machine-readable output")
    fac_sub.add_parser("destroy", help="remove every saved template")

    _runc_commands(sub)

    d = sub.add_parser("demo", help="run a built-in busybox container in its own VM")
    d.add_argument("--vm-only", action="store_true", help="only boot a VM and print what its agent reports")
    d.add_argument("--json", action="store_true", help="machine-readable output (with --vm-only)")
    return p


def _runc_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """runc's commands, same names, flags and output formats."""
    for name, helptext in (("create", "create a container (boots its VM)"), ("run", "create and start a container")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--bundle", "-b", default=".", help="path to the OCI bundle")
        c.add_argument("--console-socket", default=None, help="unix socket that receives the pty master")
        c.add_argument("--pid-file", default=None, help="write the container's host PID here")
        c.add_argument("--no-pivot", action="store_true", help="accepted (the VM has its own root)")
        c.add_argument("--no-new-keyring", action="store_true", help="accepted (the VM has its own keyrings)")
        c.add_argument("--preserve-fds", type=int, default=0, help=PRESERVE_FDS_HELP)
        if name == "run":
            c.add_argument("--detach", "-d", action="store_true", help="do not wait for the container")
            c.add_argument("--keep", action="store_true", help="do not delete the container when it exits")
        c.add_argument("id")
    ex = sub.add_parser("exec", help="run another process in a container")
    ex.add_argument("--process", "-p", default=None, help="OCI process JSON file")
    ex.add_argument("--tty", "-t", action="store_true", help="allocate a terminal")
    ex.add_argument("--detach", "-d", action="store_true", help="do not wait for the process")
    ex.add_argument("--pid-file", default=None, help="write the process's host stand-in PID here")
    ex.add_argument("--console-socket", default=None, help="unix socket that receives the pty master")
    ex.add_argument("--cwd", default=None, help="working directory in the container")
    ex.add_argument("--env", "-e", action="append", default=[], help="KEY=VALUE to add to the environment")
    ex.add_argument("--user", "-u", default=None, help="UID[:GID]")
    ex.add_argument("--preserve-fds", type=int, default=0, help=PRESERVE_FDS_HELP)
    ex.add_argument("--no-new-privs", action="store_true")
    ex.add_argument("--ignore-paused", action="store_true")
    ex.add_argument("id")
    ex.add_argument("exec_args", nargs=argparse.REMAINDER, metavar="COMMAND")
    st = sub.add_parser("start", help="start the user process of a created container")
    st.add_argument("id")
    s = sub.add_parser("state", help="print the OCI state of a container")
    s.add_argument("id")
    k = sub.add_parser("kill", help="send a signal to the container's init (or all its processes)")
    k.add_argument("--all", "-a", action="store_true")
    k.add_argument("id")
    k.add_argument("signal", nargs="?", default="SIGTERM")
    dl = sub.add_parser("delete", help="delete a stopped container (--force: any container)")
    dl.add_argument("--force", "-f", action="store_true")
    dl.add_argument("id")
    ls = sub.add_parser("list", help="list containers")
    ls.add_argument("--format", "-f", default="table", choices=["table", "json"])
    ls.add_argument("--quiet", "-q", action="store_true")
    ps = sub.add_parser("ps", help="list the host processes standing for a container")
    ps.add_argument("--format", "-f", default="table", choices=["table", "json"])
    ps.add_argument("id")
    ps.add_argument("ps_args", nargs="*")
    for name in ("pause", "resume"):
        p = sub.add_parser(name, help=f"{name} every process of the container")
        p.add_argument("id")
    up = sub.add_parser("update", help="change the container's cgroup limits (in the guest)")
    up.add_argument("--resources", "-r", default=None, help="LinuxResources JSON file ('-': stdin)")
    up.add_argument("--memory", default=None)
    up.add_argument("--memory-swap", default=None)
    up.add_argument("--memory-reservation", default=None)
    up.add_argument("--kernel-memory", default=None, help="accepted, ignored (cgroup v2 has none)")
    up.add_argument("--cpu-shares", type=int, default=None)
    up.add_argument("--cpu-quota", type=int, default=None)
    up.add_argument("--cpu-period", type=int, default=None)
    up.add_argument("--cpuset-cpus", default=None)
    up.add_argument("--cpuset-mems", default=None)
    up.add_argument("--pids-limit", type=int, default=None)
    up.add_argument("id")
    ev = sub.add_parser("events", help="print stats and OOM events as runc's JSON events")
    ev.add_argument("--stats", action="store_true", help="print one stats event and exit")
    ev.add_argument("--interval", default="5s", help="time between stats events (e.g. 5s, 500ms)")
    ev.add_argument("id")
    nw = sub.add_parser("network", help="show the network of a container's VM: interfaces, addresses, routes")
    nw.add_argument("--format", "-f", default="table", choices=["table", "json"])
    nw.add_argument("id")
    sp = sub.add_parser("spec", help="write a default config.json")
    sp.add_argument("--bundle", "-b", default=".")
    sp.add_argument("--rootless", action="store_true")
    sub.add_parser("features", help="print what this runtime supports (JSON)")
