from __future__ import annotations

import pytest

from cocoon import config
from cocoon.errors import ConfigError


def test_defaults_work_without_a_file(monkeypatch, tmp_path):
    monkeypatch.delenv("COCOON_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    cfg = config.load()
    assert cfg.hypervisor.qemu.accel == "auto"
    assert cfg.hypervisor.qemu.memory_mib == 256
    assert cfg.source == ""


def test_parse_sections():
    cfg = config.parse(
        """
[hypervisor.qemu]
accel = "tcg"
memory_mib = 512
boot_timeout = 10
[agent]
channel = "virtio-serial"
[runtime]
shared_fs = "virtio-9p"
[factory]
template = true
""",
        source="x.toml",
    )
    assert cfg.hypervisor.qemu.accel == "tcg"
    assert cfg.hypervisor.qemu.memory_mib == 512
    assert cfg.hypervisor.qemu.boot_timeout == 10.0
    assert cfg.agent.channel == "virtio-serial"
    assert cfg.runtime.shared_fs == "virtio-9p"
    assert cfg.factory.template is True
    assert cfg.source == "x.toml"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[agent]\nfoo = 1", "agent.foo"),
        ("[nope]\nx = 1", "nope"),
        ('[hypervisor.qemu]\nmemory_mib = "big"', "hypervisor.qemu.memory_mib"),
        ("[hypervisor.qemu]\nmemory_mib = true", "hypervisor.qemu.memory_mib"),
        ("[hypervisor.qemu]\nmemory_mib = -1", "hypervisor.qemu.memory_mib"),
        ('[hypervisor.qemu]\naccel = "hvf"', "hypervisor.qemu.accel"),
        ("[hypervisor.qemu]\nboot_timeout = 0", "hypervisor.qemu.boot_timeout"),
        ('[hypervisor.qemu]\nboot_timeout = "x"', "hypervisor.qemu.boot_timeout"),
        ("[agent]\ndebug = 1", "agent.debug"),
        ("[runtime]\nroot = 5", "runtime.root"),
        ("agent = 3", "agent"),
    ],
)
def test_bad_keys_and_values_name_the_key_and_file(text, key):
    with pytest.raises(ConfigError) as info:
        config.parse(text, source="/etc/cocoon/configuration.toml")
    assert info.value.key == key
    assert "/etc/cocoon/configuration.toml" in str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_toml_names_the_file():
    with pytest.raises(ConfigError) as info:
        config.parse("[agent\n", source="bad.toml")
    assert info.value.file == "bad.toml"


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.toml")


def test_env_var_names_the_file(monkeypatch, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[hypervisor.qemu]\nvcpus = 2\n")
    monkeypatch.setenv("COCOON_CONFIG", str(path))
    cfg = config.load()
    assert cfg.hypervisor.qemu.vcpus == 2
    assert cfg.source == str(path)


def test_unreadable_and_non_utf8(tmp_path):
    d = tmp_path / "dir.toml"
    d.mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(d)
    b = tmp_path / "bin.toml"
    b.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="UTF-8"):
        config.load(b)


def test_to_dict_round_trips_sections():
    d = config.Config().to_dict()
    assert d["hypervisor"]["qemu"]["machine"] == ""
    assert set(d) >= {"hypervisor", "agent", "runtime", "factory", "image"}
