"""containerd 1.6: ctr and the io.containerd.runc.v2 shim drive cocoon as their runc binary.

``ctr run --runtime io.containerd.runc.v2 --runc-binary COCOON --runc-root ROOT`` makes the shim
call ``COCOON --root ROOT/<namespace> --log <bundle>/log.json --log-format json create|start|...``.
One VM per container: four containers in all (two runs, one with a terminal, one long-lived one
that the ordered tests below exec into, pause, kill and delete).
"""

from __future__ import annotations

import os
from pathlib import Path

import helpers as h
import pytest
from helpers import IMAGE

if h.missing_binaries("containerd", "ctr", "containerd-shim-runc-v2"):
    pytest.skip("containerd is not installed", allow_module_level=True)

pytestmark = pytest.mark.integration


def test_run_stdout_stderr_exit_code(containerd, cid):
    out = containerd.ctr("run", "--rm", *containerd.runtime_flags(), IMAGE, cid,
                         "sh", "-c", "echo hello; echo oops >&2; exit 3")  # fmt: skip
    assert out.returncode == 3, out
    assert out.stdout == "hello\n", out
    assert out.stderr.strip() == "oops", out
    assert cid not in containerd.ctr("container", "list", "-q").stdout.split()


def test_run_exit_zero_with_image_config_and_env(containerd, cid):
    # The image's config (PATH, cwd, user) and --env reach the guest process; `id -u` and `pwd` run there.
    out = containerd.ctr("run", "--rm", "--env", "FOO=bar", *containerd.runtime_flags(), IMAGE, cid,
                         "sh", "-c", 'echo "$FOO $(id -u) $(pwd) $PATH"; test -x /bin/busybox')  # fmt: skip
    assert out.returncode == 0, out
    assert out.stdout == "bar 0 / /bin\n", out


def test_run_tty(containerd, cid, pty_env):
    argv = containerd.argv("run", "-t", "--rm", *containerd.runtime_flags(), IMAGE, cid,
                           "sh", "-c", "tty; echo tty-ok; exit 4")  # fmt: skip
    try:
        out = h.run_in_pty(argv, timeout=90, env=pty_env, give_up=h.StuckInCreated(containerd.cocoon_root, cid, 10))
    except AssertionError:
        containerd.cleanup(cid)
        raise
    assert out.returncode == 4, out
    lines = [line.strip() for line in out.stdout.splitlines()]
    assert lines[0].startswith("/dev/pts/"), out  # the process's stdio is a terminal in the guest
    assert "tty-ok" in lines, out
    assert "\r\n" in out.stdout, out  # and it went through a pty (onlcr)


def test_create_failure_shows_our_error(containerd, cid, tmp_path):
    """A create that cocoon refuses: ctr prints cocoon's message, which the shim read from log.json.

    go-runc reports the last ``level: error`` line of ``--log``; without it the message would be
    "... did not terminate successfully: exit status 1". No VM is booted (the bind mount fails first).
    """
    missing = tmp_path / "no-such-dir"
    out = containerd.ctr("run", "--rm", *containerd.runtime_flags(),
                         "--mount", f"type=bind,src={missing},dst=/mnt,options=rbind:ro",
                         IMAGE, cid, "true")  # fmt: skip
    assert out.returncode != 0, out
    assert "OCI runtime create failed" in out.stderr, out
    assert "bind mount source not found" in out.stderr and str(missing) in out.stderr, out
    assert "did not terminate successfully" not in out.stderr, out
    assert cid not in containerd.ctr("container", "list", "-q").stdout.split()


# -- one long-lived container, used by the ordered tests below -------------------------------------------
SLEEPER = "trap 'echo got-term; exit 42' TERM; echo started; while :; do sleep 0.1; done"


class Sleeper:
    def __init__(self, containerd, cid: str, log: Path) -> None:
        self.containerd, self.id, self.log = containerd, cid, log

    def output(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""


@pytest.fixture(scope="module")
def sleeper(containerd, session):
    cid = f"sleeper-{os.getpid()}"
    log = session.base / "containerd" / f"{cid}.out"
    out = containerd.ctr("run", "-d", "--log-uri", f"file://{log}", *containerd.runtime_flags(), IMAGE, cid,
                         "sh", "-c", SLEEPER)  # fmt: skip
    s = Sleeper(containerd, cid, log)
    try:
        assert out.returncode == 0, out
        h.wait_for(lambda: "started" in s.output(), 30, "the container's first line")
        yield s
    finally:
        containerd.cleanup(cid)
        # Its VM, virtiofsd, monitor and state must be gone with it.
        h.wait_for(lambda: not [p for p in h.ours(session.markers).values() if cid in p.cmdline]
                   and cid not in h.containers_in(containerd.cocoon_root), 30, f"{cid} to leave nothing")  # fmt: skip


def test_task_running_ps_and_state(sleeper, containerd, session):
    assert containerd.task_status(sleeper.id) == "RUNNING"
    pid = int((containerd.task_dir(sleeper.id) / "init.pid").read_text())
    listed = containerd.ctr("task", "ps", sleeper.id, check=True).stdout.split()
    assert str(pid) in listed  # cocoon ps: the monitor stands for the guest processes
    assert h.cocoon_status(containerd.cocoon_root, sleeper.id) == "running"
    st = session.cocoon_cmd(containerd.cocoon_root, "state", sleeper.id)
    assert st.returncode == 0 and f'"pid": {pid}' in st.stdout, st


def test_exec(sleeper, containerd):
    out = containerd.ctr("task", "exec", "--exec-id", "e1", sleeper.id,
                         "sh", "-c", "echo in-guest $(hostname); echo to-stderr >&2; exit 5")  # fmt: skip
    assert out.returncode == 5, out
    assert out.stdout.startswith("in-guest "), out
    assert "to-stderr" in out.stderr, out


def test_exec_failure_shows_our_error(sleeper, containerd):
    out = containerd.ctr("task", "exec", "--exec-id", "e2", sleeper.id, "/no/such/binary")
    assert out.returncode != 0, out
    error = h.last_error_line(containerd.task_dir(sleeper.id) / "log.json")
    assert error is not None, f"no error line in log.json; ctr said: {out.stderr.strip()}"
    assert error["msg"] in out.stderr, (error, out)


def test_pause_resume(sleeper, containerd):
    containerd.ctr("task", "pause", sleeper.id, check=True)
    assert containerd.task_status(sleeper.id) == "PAUSED"
    assert h.cocoon_status(containerd.cocoon_root, sleeper.id) == "paused"
    containerd.ctr("task", "resume", sleeper.id, check=True)
    assert containerd.task_status(sleeper.id) == "RUNNING"
    assert h.cocoon_status(containerd.cocoon_root, sleeper.id) == "running"


def test_kill_reports_exit_status_then_delete(sleeper, containerd):
    pid = int((containerd.task_dir(sleeper.id) / "init.pid").read_text())
    containerd.ctr("task", "kill", "-s", "SIGTERM", sleeper.id, check=True)
    h.wait_for(lambda: containerd.task_status(sleeper.id) == "STOPPED", 30, "the task to stop")
    assert "got-term" in sleeper.output()  # the signal reached the guest process, its trap ran
    assert h.cocoon_status(containerd.cocoon_root, sleeper.id) == "stopped"
    h.wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, "the monitor to exit")
    out = containerd.ctr("task", "delete", sleeper.id)
    assert out.returncode == 0, out
    assert "exit code 42" in out.stderr, out  # ctr: "task ... exit with non-zero exit code 42"
    containerd.ctr("container", "delete", sleeper.id, check=True)
    assert sleeper.id not in h.containers_in(containerd.cocoon_root)


def test_sigkill(containerd, cid):
    """SIGKILL is what `ctr task kill -s SIGKILL`, `docker rm -f` and `podman rm -f` send."""
    out = containerd.ctr("run", "-d", "--null-io", *containerd.runtime_flags(), IMAGE, cid, "sleep", "600")
    try:
        assert out.returncode == 0, out
        kill = containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
        assert kill.returncode == 0, (kill, h.last_error_line(containerd.task_dir(cid) / "log.json"))
        h.wait_for(lambda: containerd.task_status(cid) == "STOPPED", 30, "the task to stop")
        deleted = containerd.ctr("task", "delete", cid)
        assert deleted.returncode == 0 and "exit code 137" in deleted.stderr, deleted
    finally:
        containerd.cleanup(cid)
