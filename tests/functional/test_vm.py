"""A real VM boots our image and answers the agent API; every failure is clear and leaks nothing."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from cocoon.api.guest import GuestVM
from cocoon.errors import BootError, HypervisorError, ImageError

pytestmark = pytest.mark.vm


def _with_qemu(cfg, **changes):
    q = dataclasses.replace(cfg.hypervisor.qemu, **changes)
    return dataclasses.replace(cfg, hypervisor=dataclasses.replace(cfg.hypervisor, qemu=q))


@pytest.mark.parametrize("template", [False, True], ids=["cold-boot", "from-template"])
async def test_boot_check_details_datetime_stop(cfg, workdir, no_leaks, template):
    cfg = dataclasses.replace(cfg, factory=dataclasses.replace(cfg.factory, template=template))
    async with GuestVM(cfg, "t-boot", workdir) as guest:
        assert guest.times is not None and guest.times.agent_ready > 0
        assert (guest.vm.spec.incoming is not None) == template and (guest.template is not None) == template
        version = await guest.agent.version()
        assert version.agent_version
        details = await guest.agent.guest_details()
        assert details.kernel_release.endswith("amd64")
        assert 150 << 20 < details.memory_total_bytes <= 256 << 20
        assert details.cpu_count == 1
        when = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
        await guest.agent.set_guest_datetime(when)
        after = await guest.agent.guest_details()
        assert after.kernel_release == details.kernel_release
        pid = guest.vm.pid
        assert pid is not None
    assert guest.vm.exited()
    assert not (workdir / "agent.sock").exists() and not (workdir / "qmp.sock").exists()
    # The agent's own log lines reached the console (and so the host log).
    assert '"subsystem":"agent"' in (workdir / "console.log").read_text()


async def test_pause_resume(cfg, workdir, no_leaks):
    async with GuestVM(cfg, "t-pause", workdir) as guest:
        await guest.vm.pause()
        status = await guest.vm.qmp("query-status")
        assert status["status"] == "paused"
        await guest.vm.resume()
        await guest.agent.check(timeout=10)


async def test_missing_kernel_is_a_clear_error(cfg, workdir, tmp_path, no_leaks):
    bad = _with_qemu(cfg, kernel=str(tmp_path / "no-such-vmlinux"))
    with pytest.raises(HypervisorError, match="guest image file not found") as info:
        async with GuestVM(bad, "t-nokernel", workdir):
            pass
    assert "no-such-vmlinux" in str(info.value)


async def test_absent_qemu_binary(cfg, workdir, no_leaks):
    bad = _with_qemu(cfg, path="/nonexistent/qemu-system-x86_64")
    with pytest.raises(Exception, match="not found"):
        async with GuestVM(bad, "t-noqemu", workdir):
            pass
    assert not list(workdir.glob("*.sock"))


async def test_guest_panic_reports_console_tail(cfg, workdir, no_leaks):
    # No init at that path: the kernel panics; panic=-1 + -no-reboot make QEMU exit.
    bad = _with_qemu(cfg, kernel_params="rdinit=/no/such/init", boot_timeout=60)
    with pytest.raises(BootError) as info:
        async with GuestVM(bad, "t-panic", workdir):
            pass
    text = str(info.value)
    assert "qemu exited before the agent came up" in text
    assert "Kernel panic" in text or "No working init" in text or "Unable to mount root" in text


async def test_agent_that_never_answers_times_out(cfg, workdir, no_leaks):
    # busybox sleeps as init: the kernel is up but no agent ever opens its port.
    bad = _with_qemu(cfg, kernel_params="rdinit=/bin/busybox -- sleep 600", boot_timeout=4)
    with pytest.raises(BootError, match="did not open its channel in time") as info:
        async with GuestVM(bad, "t-hang", workdir):
            pass
    assert info.value.timeout == 4


def test_missing_image_cache_names_the_fix(cfg, tmp_path):
    from cocoon.image import find_image

    empty = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, cache_dir=str(tmp_path / "none")))
    with pytest.raises(ImageError, match="cocoon image build"):
        find_image(empty)


async def test_agent_debug_logs_reach_the_console(cfg, workdir, no_leaks):
    debug = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, debug=True))
    async with GuestVM(debug, "t-debug", workdir) as guest:
        assert "cocoon.debug=1" in guest.vm.spec.kernel_params
        await guest.agent.check()
    assert '"level":"debug"' in (workdir / "console.log").read_text()
