"""The real `cocoon` binary: version, check, env, demo, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COCOON = [sys.executable, "-m", "cocoon.cli.main"]


def cocoon(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*COCOON, *args], capture_output=True, text=True, timeout=timeout, env=full_env, check=False)


def test_version():
    out = cocoon("--version")
    assert out.returncode == 0 and out.stdout.startswith("cocoon version ")
    out = cocoon("version")
    assert out.returncode == 0 and "spec: 1.0" in out.stdout


def test_check_explains_the_host():
    out = cocoon("check")
    lines = out.stdout.splitlines()
    names = {line.split()[1] for line in lines if line[:4].strip() in ("OK", "WARN", "FAIL")}
    assert {"architecture", "qemu", "kvm", "vhost-vsock", "tun", "cgroups", "virtiofsd"} <= names
    assert out.returncode in (0, 1)
    assert ("cocoon can run on this host" in out.stdout) == (out.returncode == 0)
    data = json.loads(cocoon("check", "--json").stdout)
    assert all(r["status"] in ("ok", "warn", "fail") for r in data)


def test_env_json_has_config_and_detected():
    out = cocoon("env", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["config"]["hypervisor"]["qemu"]["accel"] in ("auto", "kvm", "tcg")
    assert "kvm" in data["detected"]


def test_bad_config_is_one_line_naming_key_and_file(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("[hypervisor.qemu]\nmemory = 5\n")
    out = cocoon("--config", str(conf), "env")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1
    assert "unknown key hypervisor.qemu.memory" in out.stderr and str(conf) in out.stderr


def test_missing_config_file_named_by_env(tmp_path):
    out = cocoon("env", env={"COCOON_CONFIG": str(tmp_path / "absent.toml")})
    assert out.returncode == 1 and "configuration file not found" in out.stderr


def test_error_lands_in_json_log_for_containerd(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("[agent]\nchannel = 5\n")
    log = tmp_path / "log.json"
    out = cocoon("--log", str(log), "--log-format", "json", "--config", str(conf), "env")
    assert out.returncode == 1
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["level"] == "error" and "agent.channel" in last["msg"] and "time" in last


def test_unknown_command_exits_nonzero():
    out = cocoon("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


@pytest.mark.vm
def test_demo_boots_a_vm_and_reports(cfg, tmp_path, no_leaks):
    out = cocoon("--root", str(tmp_path), "demo", "--vm-only", "--json", env={"COCOON_CONFIG": ""}, timeout=180)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["guest kernel"].endswith("amd64")
    assert report["guest cpus"] == 1
    assert not list(Path(tmp_path).iterdir())  # the demo's VM dir is gone
