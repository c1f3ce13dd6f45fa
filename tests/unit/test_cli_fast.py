"""`cocoon state`/`list` take a hand-parsed fast path: the same meaning as argparse's, fewer imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cocoon.api.state import ContainerState, StateStore
from cocoon.cli.main import fast_args
from cocoon.cli.parser import build_parser


@pytest.mark.parametrize("argv", [
    ["--root", "/r", "state", "c1"],
    ["--root=/r", "--log", "/l.json", "--log-format", "json", "state", "c1"],
    ["--debug", "--root", "/r", "state", "c1"],
    ["--root", "/r", "list"],
    ["--root", "/r", "list", "-q"],
    ["--root", "/r", "list", "-f", "json"],
    ["--root", "/r", "list", "--format=json", "--quiet"],
    ["state", "c1"],
])  # fmt: skip
def test_fast_path_means_what_argparse_means(argv: list[str]) -> None:
    fast = fast_args(argv)
    assert fast is not None
    full = vars(build_parser().parse_args(argv))
    for key, value in vars(fast).items():
        assert full[key] == value, key


@pytest.mark.parametrize("argv", [
    ["--root"], ["--root", "/r", "state"], ["--root", "/r", "state", "a", "b"], ["--root", "/r", "state", "--help"],
    ["--systemd-cgroup", "state", "c1"], ["--log-format", "xml", "state", "c1"], ["list", "-f", "yaml"],
    ["list", "-f"], ["list", "--bogus"], ["create", "c1"], [], ["--version"],
])  # fmt: skip
def test_anything_else_goes_to_argparse(argv: list[str]) -> None:
    assert fast_args(argv) is None


def test_state_does_not_import_argparse(tmp_path) -> None:
    store = StateStore(tmp_path / "root")
    store.create(ContainerState.new("c1", bundle="/b", rootfs="/b/rootfs"))
    code = ("import sys; from cocoon.cli.main import main; rc = main(sys.argv[1:]); "
            "heavy = ('argparse', 'typing', 'shutil', 'cocoon.config', 'google.protobuf'); "
            "bad = [m for m in heavy if m in sys.modules]; "
            "print('IMPORTED', bad, file=sys.stderr); sys.exit(rc)")
    # Without coverage's subprocess hook (pytest --cov sets it up; it imports typing itself).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COV_CORE_", "COVERAGE_"))}
    out = subprocess.run([sys.executable, "-c", code, "--root", str(store.root), "state", "c1"], capture_output=True,
                         text=True, check=False, timeout=30, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["id"] == "c1"
    assert "IMPORTED []" in out.stderr
