"""dockerd 20.10 with ``--add-runtime cocoon=COCOON``: ``docker run --runtime cocoon``.

dockerd's containerd runs the runc v2 shim with ``BinaryName`` = COCOON and ``--root
<exec-root>/runtime-runc/moby``. Two containers (VMs): the ``--network none`` case the docs
promise, and ``--network host`` (no network namespace in the spec, nothing changes on the host:
the container uses its VM's network either way).
"""

from __future__ import annotations

import helpers as h
import pytest
from helpers import IMAGE

if h.missing_binaries("dockerd", "docker"):
    pytest.skip("docker.io is not installed", allow_module_level=True)

pytestmark = pytest.mark.integration

SCRIPT = "echo hi; echo to-stderr >&2; exit 3"


def _check_run(docker, cid: str, network: str) -> None:
    out = docker("run", "--runtime", "cocoon", "--rm", "--network", network, "--name", cid, IMAGE, "sh", "-c", SCRIPT)
    assert out.returncode == 3, out  # the container's status, not docker's 125/126/127
    assert out.stdout == "hi\n", out
    assert out.stderr.strip() == "to-stderr", out
    assert docker("ps", "-aq", "--filter", f"name={cid}").stdout.strip() == ""  # --rm removed it


def test_run_network_none(docker, cid):
    _check_run(docker, cid, "none")


def test_run_network_host(docker, cid):
    _check_run(docker, cid, "host")
