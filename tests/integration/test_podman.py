"""podman 4.3 + conmon drive cocoon: ``podman --runtime COCOON run --network none ...``.

conmon calls ``COCOON create --bundle B --pid-file P [--console-socket S] ID`` (no global flags),
podman itself ``start``, ``kill``, ``delete --force`` and conmon ``exec``. Three containers (VMs).
"""

from __future__ import annotations

import os

import helpers as h
import pytest
from helpers import IMAGE

if h.missing_binaries("podman", "conmon"):
    pytest.skip("podman/conmon are not installed", allow_module_level=True)

pytestmark = pytest.mark.integration


def test_run_echo_hi(podman, cid):
    out = podman("run", "--rm", "--network", "none", "--name", cid, IMAGE, "echo", "hi")
    assert out.returncode == 0, out
    assert out.stdout == "hi\n", out
    assert podman("ps", "-a", "-q", "--filter", f"name={cid}").stdout.strip() == ""  # --rm removed it


def test_run_tty_and_exit_code(podman, cid):
    out = podman("run", "--rm", "-t", "--network", "none", "--name", cid, IMAGE,
                 "sh", "-c", "tty; echo to-stderr >&2; exit 3")  # fmt: skip
    assert out.returncode == 3, out  # the container's status is podman's
    lines = [line.strip() for line in out.stdout.splitlines()]
    assert lines[0].startswith("/dev/pts/"), out  # a terminal in the guest
    assert "to-stderr" in lines, out  # a terminal merges stderr into the one stream
    assert "\r\n" in out.stdout, out


# -- one long-lived container, used by the ordered tests below ---------------------------------------------
SLEEPER = "trap 'echo got-usr1' USR1; echo started; echo started-err >&2; while :; do sleep 0.1; done"


@pytest.fixture(scope="module")
def sleeper(podman, session):
    name = f"sleeper-{os.getpid()}"
    out = podman("run", "-d", "--network", "none", "--name", name, IMAGE, "sh", "-c", SLEEPER)
    full_id = out.stdout.strip()  # the id cocoon sees
    try:
        assert out.returncode == 0 and full_id, out
        h.wait_for(lambda: "started" in podman("logs", name).stdout, 30, "the container's first line")
        yield name
    finally:
        podman("rm", "--force", "--time", "0", name)
        h.wait_for(lambda: not _processes_of(session, full_id), 30, f"{name} to leave no process")


def _processes_of(session, container_id: str) -> list[h.Proc]:
    return [p for p in h.ours(session.markers).values() if container_id and container_id in p.cmdline]


def test_running_and_logs(sleeper, podman):
    st = podman("inspect", "--format", "{{.State.Status}} {{.OCIRuntime}}", sleeper, check=True)
    assert st.stdout.split()[0] == "running", st
    logs = podman("logs", sleeper, check=True)
    assert logs.stdout.splitlines()[0] == "started", logs  # stdout and stderr kept apart
    assert "started-err" in logs.stderr and "started-err" not in logs.stdout, logs


def test_exec(sleeper, podman):
    out = podman("exec", sleeper, "sh", "-c", "echo in-guest; echo to-stderr >&2; exit 5")
    assert out.returncode == 5, out
    assert out.stdout == "in-guest\n", out
    assert "to-stderr" in out.stderr, out


def test_kill_delivers_signal(sleeper, podman):
    podman("kill", "--signal", "USR1", sleeper, check=True)
    h.wait_for(lambda: "got-usr1" in podman("logs", sleeper).stdout, 30, "the trap's output")
    st = podman("inspect", "--format", "{{.State.Status}}", sleeper, check=True)
    assert st.stdout.strip() == "running", st  # the trap handled it


def test_rm_force(sleeper, podman, session):
    full_id = podman("inspect", "--format", "{{.Id}}", sleeper, check=True).stdout.strip()
    assert _processes_of(session, full_id)  # its monitor, VM and virtiofsd
    out = podman("rm", "--force", "--time", "0", sleeper)
    assert out.returncode == 0, out
    assert podman("ps", "-a", "-q", "--filter", f"name={sleeper}").stdout.strip() == ""
    h.wait_for(lambda: not _processes_of(session, full_id), 30, "its VM and monitor to go")
    assert full_id not in h.containers_in(podman.cocoon_root)
