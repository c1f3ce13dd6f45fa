"""containerd 1.6 drives containerd-shim-cocoon-v2 (``ctr run --runtime io.containerd.cocoon.v2``).

One VM per container here (no pod annotations): a run with output and an exit code, then one
long-lived container the ordered tests exec into (with and without a terminal), pause, resume,
read metrics of, kill and delete. After each: no shim, VM or shim state directory left.
"""

from __future__ import annotations

import os
import subprocess
import time

import helpers as h
import pytest
import shim_env
from helpers import IMAGE
from shim_env import RUNTIME

pytestmark = pytest.mark.integration

if h.missing_binaries("containerd", "ctr"):
    pytest.skip("containerd is not installed", allow_module_level=True)


def _nothing_left(c: shim_env.ShimContainerd) -> None:
    assert shim_env.wait_gone(c.shims) == [], "a shim outlived its last task"
    assert shim_env.wait_gone(c.vms) == [], "a VM outlived its shim"
    assert shim_env.wait_gone(c.shim_dirs) == [], "a shim's state directory was left"
    assert h.mounts_below(c.cocoon_root) == []


def test_run_output_exit_code_and_events_in_order(shim_containerd, cid):
    c = shim_containerd
    events = subprocess.Popen(["ctr", "-a", c.sock, "events"], stdout=subprocess.PIPE, text=True)
    try:
        out = c.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, cid, "sh", "-c", "echo hello; echo oops >&2; exit 3")
        assert out.returncode == 3, out
        assert out.stdout == "hello\n", out
        assert out.stderr.strip() == "oops", out
        time.sleep(1)
    finally:
        events.terminate()
        seen, _ = events.communicate(timeout=10)
    # "<date> <time> +0000 UTC <namespace> <topic> <event as JSON>"
    topics = [line.split()[5] for line in seen.splitlines() if cid in line and len(line.split()) > 5]
    task_topics = [t for t in topics if t.startswith("/tasks/")]
    assert task_topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], seen
    _nothing_left(c)


def test_no_output_lost_at_exit(shim_containerd, cid):
    # ~1.3 MB written right before the process exits: every byte must reach ctr before the exit.
    out = shim_containerd.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, cid, "seq", "1", "200000", timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 200000 and lines[-1] == "200000", (len(lines), lines[-3:])
    _nothing_left(shim_containerd)


@pytest.fixture(scope="module")
def box(shim_containerd):
    c = shim_containerd
    name = f"shimbox-{os.getpid()}"
    out = c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, name, "sh", "-c",
                'trap "echo bye; exit 7" TERM; while true; do sleep 0.2; done')  # fmt: skip
    assert out.returncode == 0, out
    yield name
    c.ctr("task", "kill", "-s", "SIGKILL", name)
    c.ctr("task", "delete", "-f", name)
    c.ctr("container", "delete", name)
    _nothing_left(c)


def _status(c: shim_env.ShimContainerd, name: str) -> str | None:
    for line in c.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return fields[-1]
    return None


def test_exec_with_stdin_and_exit_code(shim_containerd, box):
    argv = ["ctr", "-a", shim_containerd.sock, "-n", shim_env.NAMESPACE_CTR, "task", "exec", "--exec-id", "e1", box,
            "sh"]  # fmt: skip
    out = subprocess.run(
        argv, check=False, input="echo from-stdin; exit 9\n", capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 9, out
    assert out.stdout == "from-stdin\n", out


def test_exec_with_terminal(shim_containerd, box, pty_env):
    c = shim_containerd
    argv = ["ctr", "-a", c.sock, "-n", shim_env.NAMESPACE_CTR, "task", "exec", "-t", "--exec-id", "t1", box,
            "sh", "-c", "tty; exit 4"]  # fmt: skip
    out = h.run_in_pty(argv, timeout=90, env=pty_env)
    assert out.returncode == 4, out
    assert "/dev/pts/" in out.stdout, out


def test_pause_resume_metrics(shim_containerd, box):
    c = shim_containerd
    assert c.ctr("task", "pause", box).returncode == 0
    assert _status(c, box) == "PAUSED"
    assert c.ctr("task", "resume", box).returncode == 0
    assert _status(c, box) == "RUNNING"
    metrics = c.ctr("task", "metrics", box)
    assert metrics.returncode == 0, metrics
    values = dict(line.split()[:2] for line in metrics.stdout.splitlines() if line.startswith(("pids.", "memory.")))
    assert int(values["pids.current"]) >= 2, metrics.stdout
    assert int(values["memory.usage"]) > 0, metrics.stdout


def test_kill_reports_the_exit_status(shim_containerd, box):
    c = shim_containerd
    events = subprocess.Popen(["ctr", "-a", c.sock, "events"], stdout=subprocess.PIPE, text=True)
    try:
        assert c.ctr("task", "kill", "-s", "SIGTERM", box).returncode == 0
        h.wait_for(lambda: _status(c, box) == "STOPPED", 30, "the task to stop")
        time.sleep(0.5)
    finally:
        events.terminate()
        seen, _ = events.communicate(timeout=10)
    exits = [line for line in seen.splitlines() if "/tasks/exit" in line and box in line]
    assert len(exits) == 1 and '"exit_status":7' in exits[0].replace(" ", ""), seen
    assert c.ctr("task", "delete", box).returncode == 0
