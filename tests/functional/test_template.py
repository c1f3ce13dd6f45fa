"""VM templating (cocoon.api.factory): the first sandbox of a shape builds and saves a template,
every sandbox starts by restoring it. Checked on real VMs: containers run in restored sandboxes
with their own shares and hostnames, clones do not share random numbers (the agent reseeds the
guest's CRNG), a stale-free guest clock, nothing of a clone is left behind, and a template that
does not fit the machine fails the start clearly.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import pytest
from test_sandbox_api import bundle_with_volume, needs_root

from cocoon.api import factory
from cocoon.api.guest import GuestVM
from cocoon.api.sandbox import Sandbox
from cocoon.errors import BootError

pytestmark = [pytest.mark.vm, needs_root]


@pytest.fixture
def tcfg(cfg):
    """``cfg`` with templates on, kept in a tmpfs directory of this test."""
    directory = Path(f"/dev/shm/cocoon-test-templates-{os.getpid()}")
    shutil.rmtree(directory, ignore_errors=True)
    yield dataclasses.replace(cfg, factory=dataclasses.replace(cfg.factory, template=True,
                                                               template_dir=str(directory)))  # fmt: skip
    shutil.rmtree(directory, ignore_errors=True)


async def _run_in_sandbox(cfg, tmp_path: Path, name: str) -> tuple[bytes, GuestVM]:
    volume = tmp_path / f"vol-{name}"
    volume.mkdir()
    (volume / "f").write_text(f"volume of {name}\n")
    spec = bundle_with_volume(tmp_path / name, ["sh", "-c", "hostname; cat /data/f; date +%s; "
                                                "head -c 16 /dev/urandom | od -A n -t x1"], volume)  # fmt: skip
    async with Sandbox(cfg, f"tpl-{name}-{os.getpid()}", tmp_path / f"sb-{name}", hostname=name) as sb:
        c = await sb.create_container("c", spec)
        await c.start()
        out, err, status = await c.init.output()
        assert status == 0, (out, err)
        guest = sb._guest
        assert guest is not None
        return out, guest


async def test_sandboxes_start_from_a_template(tcfg, no_leaks, tmp_path):
    out_a, guest_a = await _run_in_sandbox(tcfg, tmp_path, "a")
    out_b, guest_b = await _run_in_sandbox(tcfg, tmp_path, "b")
    for out, guest, name in ((out_a, guest_a, "a"), (out_b, guest_b, "b")):
        assert guest.template is not None and guest.vm is not None and guest.vm.spec.incoming is not None
        lines = out.decode().splitlines()
        assert lines[0] == "cocoon-demo" and lines[1] == f"volume of {name}", lines  # the spec's hostname
        assert abs(int(lines[2]) - time.time()) < 120, lines  # the clock is now's, not the template's
    assert out_a.splitlines()[3] != out_b.splitlines()[3], "two clones drew the same random bytes"
    assert guest_a.template == guest_b.template  # one template for both
    templates = factory.list_templates(tcfg)
    assert len(templates) == 1 and templates[0]["hotplug_slots"] == factory.EXTRA_SLOTS, templates
    # No clone left its RAM copy behind, and the template is complete.
    base = Path(tcfg.factory.template_dir)
    assert sorted(p.name for p in base.iterdir()) == sorted([templates[0]["key"], f"{templates[0]['key']}.lock"])
    assert {p.name for p in guest_a.template.directory.iterdir()} >= {"ram", "state", "meta.json"}
    assert factory.destroy_templates(tcfg) == [templates[0]["key"]]
    assert factory.list_templates(tcfg) == []


async def test_a_template_that_does_not_fit_fails_clearly(tcfg, no_leaks, tmp_path):
    guest = GuestVM(tcfg, f"tpl-bad-{os.getpid()}", tmp_path / "g")
    spec = await guest.vm_spec()
    template = await factory.ensure_template(tcfg, spec)
    template.state.write_bytes(b"QEVM not really a saved state")
    with pytest.raises(BootError, match="restoring a saved VM") as err:
        await GuestVM(tcfg, f"tpl-bad2-{os.getpid()}", tmp_path / "g2").start()
    assert err.value.context.get("qemu_stderr"), err.value.context
    assert not list(Path(tcfg.factory.template_dir).glob("clone-*"))
    assert not template.directory.exists()  # removed: the next start builds a good one
    async with GuestVM(tcfg, f"tpl-good-{os.getpid()}", tmp_path / "g3") as guest:
        assert guest.template is not None and guest.vm.spec.incoming is not None
        await guest.agent.check()


async def test_a_template_that_cannot_be_built_falls_back_to_a_cold_boot(tcfg, no_leaks, tmp_path, monkeypatch):
    async def cannot_build(cfg, spec, directory):
        raise BootError("guest agent did not answer", sandbox="template")

    monkeypatch.setattr(factory, "build_template", cannot_build)
    async with GuestVM(tcfg, f"tpl-nobuild-{os.getpid()}", tmp_path / "g") as guest:
        assert guest.template is None and guest.vm.spec.incoming is None  # booted cold
        await guest.agent.check()
    assert factory.list_templates(tcfg) == []


def test_cli_containers_restore_from_a_template(tcfg, no_leaks, tmp_path):
    # The real CLI (monitor, stand-in, exec through the control socket) on a restored sandbox.
    import subprocess

    from test_containers import Cli

    from cocoon.api.bundle import make_bundle

    conf = tmp_path / "cocoon.toml"
    conf.write_text(f'[factory]\ntemplate = true\ntemplate_dir = "{tcfg.factory.template_dir}"\n')
    cli = Cli(tmp_path / "root", {**os.environ, "COCOON_CONFIG": str(conf)})
    bundle = make_bundle(tmp_path / "b", ["sh", "-c", "hostname; exit 7"])
    first = cli("run", "--bundle", str(bundle), "t1", stdin=subprocess.DEVNULL)
    assert (first.returncode, first.stdout) == (7, "cocoon-demo\n"), first.stderr
    assert len(factory.list_templates(tcfg)) == 1  # the first run built it; the second restores it
    sleeper = make_bundle(tmp_path / "s", ["sleep", "600"])
    created = cli.detached(tmp_path, "create", "--bundle", str(sleeper), "t2")
    assert created.returncode == 0, created.stderr
    try:
        assert cli("start", "t2").returncode == 0
        probe = cli("exec", "t2", "sh", "-c", "grep -c virtiofs /proc/mounts; ls /")
        assert probe.returncode == 0 and "bin" in probe.stdout.split(), probe.stdout + probe.stderr
    finally:
        assert cli("delete", "--force", "t2").returncode == 0
    # `cocoon factory`: what is saved, another size made ahead of time, all of it removed.
    import json

    status = json.loads(cli("factory", "status", "--json").stdout)
    assert status["enabled"] and [t["memory_mib"] for t in status["templates"]] == [256], status
    made = cli("factory", "init", "--memory-mib", "320")
    assert made.returncode == 0 and "320 MiB" in made.stdout, made.stderr
    assert sorted(t["memory_mib"] for t in factory.list_templates(tcfg)) == [256, 320]
    gone = cli("factory", "destroy")
    assert gone.returncode == 0 and len(gone.stdout.splitlines()) == 2 and factory.list_templates(tcfg) == []
