from __future__ import annotations

import io
import json
import logging

import pytest

from cocoon import log
from cocoon.errors import BootError, CocoonError, ConfigError, HypervisorError, InvalidArgument


def test_error_renders_context_on_one_line():
    err = ConfigError("unknown key agent.foo", file="/etc/c.toml", key="agent.foo")
    assert str(err) == "unknown key agent.foo (file=/etc/c.toml, key=agent.foo)"
    assert err.key == "agent.foo"
    assert err.missing is None
    assert isinstance(err, CocoonError)


def test_error_add_context_does_not_override():
    err = CocoonError("boom", id="a").add_context(id="b", path="/x")
    assert err.context == {"id": "a", "path": "/x"}


def test_boot_error_appends_console_tail():
    err = BootError("guest did not come up", sandbox="s1", console_tail="Kernel panic")
    text = str(err)
    assert text.splitlines()[0] == "guest did not come up (sandbox=s1)"
    assert "Kernel panic" in text
    assert isinstance(err, HypervisorError)


def test_long_context_values_are_cut():
    assert len(str(CocoonError("x", stderr="y" * 1000))) < 260


def _capture(fmt: str) -> tuple[io.StringIO, logging.Handler]:
    buf = io.StringIO()
    handler = log.setup(level="debug", fmt=fmt, stream=buf)
    return buf, handler


def test_json_lines_are_runc_compatible_and_carry_subsystem():
    buf, _ = _capture("json")
    with log.bind(sandbox="sb1"):
        log.get_logger("hypervisor").info("qemu started", qemu_pid=42)
    line = json.loads(buf.getvalue().splitlines()[-1])
    assert line["level"] == "info"
    assert line["msg"] == "qemu started"
    assert line["subsystem"] == "hypervisor"
    assert line["sandbox"] == "sb1"
    assert line["qemu_pid"] == 42
    assert line["time"].endswith("Z")
    assert isinstance(line["pid"], int)


def test_logfmt_quotes_values_with_spaces():
    buf, _ = _capture("logfmt")
    log.get_logger("cli").warning("falling back to tcg", reason="no kvm here")
    text = buf.getvalue().splitlines()[-1]
    assert 'msg="falling back to tcg"' in text
    assert "level=warning" in text
    assert "subsystem=cli" in text
    assert 'reason="no kvm here"' in text


def test_exception_is_rendered():
    buf, _ = _capture("json")
    try:
        raise InvalidArgument("bad id", field="id")
    except InvalidArgument:
        log.get_logger("cli").exception("failed")
    line = json.loads(buf.getvalue().splitlines()[-1])
    assert line["level"] == "error"
    assert "InvalidArgument: bad id" in line["error"]


def test_unknown_format_is_rejected():
    with pytest.raises(InvalidArgument):
        log.setup(fmt="xml")


def test_log_to_file(tmp_path):
    path = tmp_path / "log.json"
    log.setup(fmt="json", path=path)
    log.get_logger("cli").error("container not found", id="c1")
    logging.getLogger("cocoon").handlers[0].flush()
    rec = json.loads(path.read_text().splitlines()[-1])
    assert rec["msg"] == "container not found"
    assert rec["id"] == "c1"
