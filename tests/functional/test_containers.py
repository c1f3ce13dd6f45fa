"""Containers in VMs through the real `cocoon` CLI, the way runc clients drive it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cocoon.api.bundle import make_bundle
from cocoon.storage.shared import mounts_below

pytestmark = pytest.mark.vm


class Cli:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cocoon.cli.main", "--root", str(self.root), *args]

    def __call__(self, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, env=self.env,
                              check=False, **kw)  # fmt: skip

    def detached(self, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """create / run -d / exec -d: the container keeps the stdio it was given (as with runc), so
        give it files, not the pipes subprocess would wait on."""
        out, err = tmp_path / f"{args[0]}.out", tmp_path / f"{args[0]}.err"
        with out.open("w") as o, err.open("w") as e:
            proc = subprocess.run(self.argv(*args), stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=self.env,
                                  timeout=120, check=False)  # fmt: skip
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())

    def state(self, cid: str) -> dict:
        out = self("state", cid)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


@pytest.fixture
def cli(cfg, tmp_path, no_leaks):
    root = tmp_path / "root"
    env = {**os.environ, "COCOON_CONFIG": ""}
    c = Cli(root, env)
    yield c
    # Nothing of any container may survive its test: no state, no mount, no socket, no monitor (no_leaks).
    if root.exists():
        left = [p.name for p in root.iterdir() if not p.name.startswith("~")]
        for cid in left:
            c("delete", "--force", cid)
        assert not left, f"leaked containers: {left}"
        assert not mounts_below(root)
        sockets = [str(p) for p in root.rglob("*") if p.is_socket()]
        assert not sockets, f"leaked sockets: {sockets}"
        rest = sorted(p.name for p in root.iterdir())  # ~sock goes with the last delete; no ~deleting.*
        assert not rest, f"left in the state root: {rest}"


def wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still alive")


def test_run_foreground_stdout_stderr_exit_code(cli, tmp_path):
    bundle = make_bundle(tmp_path / "b", ["sh", "-c", "echo hello; echo oops >&2; uname -r; exit 3"])
    out = cli("run", "--bundle", str(bundle), "c-run")
    assert out.returncode == 3, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "hello" and lines[1].endswith("amd64")
    assert "oops" in out.stderr
    assert not (cli.root / "c-run").exists()  # run deletes the container when it exits


def test_start_container_hook_runs_in_the_container(cli, tmp_path):
    # startContainer: in the container's namespaces, after start, before the user process; its path
    # resolves in the container's rootfs (here: the bundle's busybox, inside the guest).
    bundle = make_bundle(tmp_path / "b", ["sh", "-c", "cat /tmp/hooked"])
    doc = json.loads((bundle / "config.json").read_text())
    hook = {"path": "/bin/sh", "args": ["sh", "-c", "echo hook-in-$(hostname) > /tmp/hooked"]}
    doc["hooks"] = {"startContainer": [hook]}
    (bundle / "config.json").write_text(json.dumps(doc))
    out = cli("run", "--bundle", str(bundle), "c-hook")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hook-in-cocoon-demo"


def test_create_start_exec_pause_kill_delete(cli, tmp_path):
    bundle = make_bundle(
        tmp_path / "b", ["sh", "-c", "trap 'echo got-term; exit 42' TERM; while :; do sleep 0.1; done"]
    )
    pid_file = tmp_path / "init.pid"
    log_file = tmp_path / "out.log"
    err_file = tmp_path / "err.log"
    # As with runc, the container (here: its monitor) keeps create's stdout/stderr: files, not pipes.
    with log_file.open("w") as out_fh, err_file.open("w") as err_fh:
        argv = cli.argv("create", "--bundle", str(bundle), "--pid-file", str(pid_file), "c1")
        proc = subprocess.run(argv, stdout=out_fh, stderr=err_fh, stdin=subprocess.DEVNULL, env=cli.env, timeout=120,
                              check=False)  # fmt: skip
    assert proc.returncode == 0, err_file.read_text()
    pid = int(pid_file.read_text())
    st = cli.state("c1")
    assert st["status"] == "created" and st["pid"] == pid and st["bundle"] == str(bundle)
    assert cli("start", "c1").returncode == 0
    assert cli.state("c1")["status"] == "running"
    _err = cli("start", "c1")
    assert _err.returncode == 1 and "running" in _err.stderr

    ex = cli("exec", "c1", "sh", "-c", "echo in-guest $(hostname); exit 7")
    assert ex.returncode == 7, ex.stderr
    assert ex.stdout.strip() == "in-guest cocoon-demo"
    exec_pid_file = tmp_path / "exec.pid"
    d = cli.detached(tmp_path, "exec", "-d", "--pid-file", str(exec_pid_file), "c1", "sleep", "30")
    assert d.returncode == 0, d.stderr
    exec_pid = int(exec_pid_file.read_text())
    os.kill(exec_pid, 0)
    # ps: JSON as runc (the host pid standing for the container), the table from the guest.
    assert json.loads(cli("ps", "--format", "json", "c1").stdout) == [pid]
    table = cli("ps", "c1")
    assert table.returncode == 0, table.stderr
    rows = [line.split(None, 4) for line in table.stdout.splitlines()]
    assert rows[0] == ["UID", "PID", "PPID", "STAT", "CMD"]
    commands = [r[4] for r in rows[1:]]
    assert any(c.startswith("sh -c trap") for c in commands) and "sleep 30" in commands, table.stdout

    assert cli("pause", "c1").returncode == 0
    assert cli.state("c1")["status"] == "paused"
    assert cli("resume", "c1").returncode == 0
    assert cli.state("c1")["status"] == "running"
    assert cli("update", "--pids-limit", "50", "--memory", "128m", "c1").returncode == 0
    ev = json.loads(cli("events", "--stats", "c1").stdout)
    assert ev["type"] == "stats" and ev["id"] == "c1"
    assert ev["data"]["pids"]["limit"] == 50 and ev["data"]["pids"]["current"] >= 1
    assert ev["data"]["memory"]["usage"]["limit"] == 128 << 20
    assert ev["data"]["memory"]["usage"]["usage"] > 0
    listed = json.loads(cli("list", "-f", "json").stdout)
    assert [e["id"] for e in listed] == ["c1"]
    refused = cli("delete", "c1")
    assert refused.returncode == 1 and "not stopped" in refused.stderr

    assert cli("kill", "c1", "TERM").returncode == 0
    wait_exit(pid, 30)
    wait_exit(exec_pid, 30)
    assert "got-term" in log_file.read_text()
    assert cli.state("c1")["status"] == "stopped"
    assert cli("delete", "c1").returncode == 0
    assert not (cli.root / "c1").exists()


def test_events_streams_oom_kill(cli, tmp_path):
    # dd's 64 MiB buffer in a 32 MiB cgroup: the guest kernel OOM-kills it, the init's status is 137.
    bundle = make_bundle(tmp_path / "b", ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"])
    doc = json.loads((bundle / "config.json").read_text())
    doc["linux"].setdefault("resources", {})["memory"] = {"limit": 32 << 20}
    (bundle / "config.json").write_text(json.dumps(doc))
    pid_file = tmp_path / "init.pid"
    created = cli.detached(tmp_path, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), "c-oom")
    assert created.returncode == 0, created.stderr
    events = subprocess.Popen(cli.argv("events", "--interval", "1s", "c-oom"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=cli.env)  # fmt: skip
    try:
        assert events.stdout is not None
        first = json.loads(events.stdout.readline())  # stats printed: the OOM wait is registered
        assert first["type"] == "stats" and first["id"] == "c-oom"
        assert cli("start", "c-oom").returncode == 0
        out, err = events.communicate(timeout=60)  # ends when the container stops
    finally:
        events.kill()
    assert events.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert {"type": "oom", "id": "c-oom"} in lines, out
    wait_exit(int(pid_file.read_text()), 30)
    assert cli.state("c-oom")["status"] == "stopped"
    # The monitor's exit status (what a runc client's waitpid sees) is recorded in the state file.
    assert json.loads((cli.root / "c-oom" / "state.json").read_text())["exit_code"] == 137
    assert cli("delete", "c-oom").returncode == 0


def test_vm_killed_under_running_container(cli, tmp_path):
    bundle = make_bundle(tmp_path / "b", ["sleep", "600"])
    pid_file = tmp_path / "init.pid"
    assert (
        cli.detached(tmp_path, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), "c-dead").returncode == 0
    )
    assert cli("start", "c-dead").returncode == 0
    qemu = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and
            b"cocoon-c-dead" in (p / "cmdline").read_bytes()]  # fmt: skip
    assert qemu
    os.kill(qemu[0], signal.SIGKILL)
    wait_exit(int(pid_file.read_text()), 30)
    assert cli.state("c-dead")["status"] == "stopped"
    assert cli("delete", "c-dead").returncode == 0


def test_delete_force_of_running_container(cli, tmp_path):
    bundle = make_bundle(tmp_path / "b", ["sleep", "600"])
    pid_file = tmp_path / "init.pid"
    assert (
        cli.detached(tmp_path, "run", "-d", "--bundle", str(bundle), "--pid-file", str(pid_file), "c-force").returncode
        == 0
    )
    assert cli.state("c-force")["status"] == "running"
    assert cli("delete", "--force", "c-force").returncode == 0
    wait_exit(int(pid_file.read_text()), 30)
    assert not (cli.root / "c-force").exists()
