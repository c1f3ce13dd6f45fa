"""Configuration: one TOML file, frozen dataclasses, errors that name the key and the file.

The file is ``/etc/cocoon/configuration.toml`` unless ``--config`` or
``COCOON_CONFIG`` names another. A missing default file means "all defaults"; a
missing file that was asked for by name is an error. Sections follow Kata's::

    [hypervisor.qemu]   # the VMM: binary, machine, accelerator, guest size
    [agent]             # the guest agent channel and timeouts
    [runtime]           # state root, logging, shared filesystem, networking model
    [factory]           # VM templating
    [image]             # where guest images are built and cached

Every field has a default that works on a stock Debian 12 host.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from cocoon.errors import ConfigError

DEFAULT_PATH = Path("/etc/cocoon/configuration.toml")
ENV_VAR = "COCOON_CONFIG"

Accel = Literal["auto", "kvm", "tcg"]
SharedFS = Literal["virtio-fs", "virtio-9p", "none"]
AgentChannel = Literal["auto", "virtio-serial", "vsock"]
NetModel = Literal["tcfilter", "macvtap", "none"]
LogFormat = Literal["logfmt", "json", "text"]


@dataclass(frozen=True)
class QemuConfig:
    """[hypervisor.qemu]"""

    path: str = ""  # empty: the per-architecture default binary found on PATH
    machine: str = ""  # empty: the architecture's default (microvm on x86_64)
    accel: Accel = "auto"  # auto: KVM if a probe boot succeeds, else TCG
    memory_mib: int = 256
    vcpus: int = 1
    max_vcpus: int = 0  # 0: same as vcpus
    kernel: str = ""  # empty: the built image's kernel
    initrd: str = ""  # empty: the built image's initrd
    kernel_params: str = ""  # appended to the architecture's defaults
    tcg_tb_size_mib: int = 32  # TCG translation cache: trades memory for speed
    boot_timeout: float = 30.0  # seconds until the agent must answer
    shutdown_timeout: float = 5.0  # seconds a graceful stop may take before SIGKILL
    kvm_probe_timeout: float = 8.0
    hotplug_slots: int = 0  # PCIe root ports for NICs added while the VM runs; 0: no hot-plug


@dataclass(frozen=True)
class HypervisorConfig:
    """[hypervisor]: the driver to use and its sections."""

    driver: str = "qemu"
    qemu: QemuConfig = field(default_factory=QemuConfig)


@dataclass(frozen=True)
class AgentConfig:
    """[agent]"""

    channel: AgentChannel = "auto"  # auto: vsock where /dev/vhost-vsock works, else virtio-serial
    vsock_port: int = 1024
    call_timeout: float = 30.0
    debug: bool = False


@dataclass(frozen=True)
class RuntimeConfig:
    """[runtime]"""

    root: str = "/run/cocoon"
    log_level: str = "info"
    log_format: LogFormat = "logfmt"
    shared_fs: SharedFS = "virtio-fs"
    virtiofsd: str = "/usr/lib/qemu/virtiofsd"
    internetworking_model: NetModel = "tcfilter"


@dataclass(frozen=True)
class FactoryConfig:
    """[factory]: boot sandboxes by restoring a saved template VM."""

    template: bool = True  # start sandboxes by restoring a saved template VM (docs/factory.md)
    template_dir: str = "/dev/shm/cocoon/templates"  # a tmpfs: templates' and clones' guest RAM live here


@dataclass(frozen=True)
class ImageConfig:
    """[image]"""

    cache_dir: str = "/var/cache/cocoon/images"
    kernel: str = ""  # empty: newest /boot/vmlinuz-*-cloud-amd64
    compression: Literal["none", "gzip"] = "none"


@dataclass(frozen=True)
class Config:
    """The whole effective configuration."""

    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    factory: FactoryConfig = field(default_factory=FactoryConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    source: str = ""  # the file it came from ("" = defaults only)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


T = TypeVar("T")


def _check_value(value: Any, hint: Any, key: str, path: str) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(
                f"bad value for {key}: {value!r} (expected one of {', '.join(map(repr, choices))})",
                file=path,
                key=key,
            )
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"bad type for {key}: expected a boolean", file=path, key=key)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"bad type for {key}: expected an integer", file=path, key=key)
        if value < 0:
            raise ConfigError(f"bad value for {key}: must not be negative", file=path, key=key)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"bad type for {key}: expected a number", file=path, key=key)
        if value <= 0:
            raise ConfigError(f"bad value for {key}: must be positive", file=path, key=key)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"bad type for {key}: expected a string", file=path, key=key)
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"bad type for [{key}]: expected a table", file=path, key=key)
        return _build(hint, value, key, path)
    if isinstance(hint, types.UnionType):  # pragma: no cover - not used by the schema today
        raise ConfigError(f"unsupported type for {key}", file=path, key=key)
    raise ConfigError(f"unsupported type for {key}", file=path, key=key)  # pragma: no cover


def _build(cls: type[T], data: dict[str, Any], prefix: str, path: str) -> T:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "source"}  # type: ignore[arg-type]
    for key in data:
        if key not in known:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown key {full}", file=path, key=full)
    kwargs = {
        key: _check_value(value, hints[key], f"{prefix}.{key}" if prefix else key, path) for key, value in data.items()
    }
    return cls(**kwargs)


def parse(text: str, *, source: str = "<string>") -> Config:
    """Parse TOML text into a Config; every error names the file and key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", file=source) from exc
    cfg = _build(Config, data, "", source)
    return dataclasses.replace(cfg, source=source)


def config_path(explicit: str | os.PathLike[str] | None = None) -> tuple[Path, bool]:
    """The file to read and whether it was asked for by name (then it must exist)."""
    if explicit:
        return Path(explicit), True
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env), True
    return DEFAULT_PATH, False


def load(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Load the effective configuration (flag > $COCOON_CONFIG > /etc/cocoon/configuration.toml)."""
    path, required = config_path(explicit)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError("configuration file not found", file=str(path)) from None
        return Config()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration: {exc.strerror}", file=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("configuration is not valid UTF-8", file=str(path)) from exc
    return parse(text, source=str(path))
