"""Fixtures for tests that boot real VMs: the image is built once per session."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from cocoon import config


def _have_qemu() -> bool:
    return shutil.which("qemu-system-x86_64") is not None


@pytest.fixture(scope="session")
def base_config(tmp_path_factory) -> config.Config:
    """Defaults, with state under a temp root and TCG forced unless COCOON_TEST_ACCEL says otherwise."""
    import os

    if not _have_qemu():
        pytest.skip("qemu-system-x86_64 is not installed (make deps installs it)")
    root = tmp_path_factory.mktemp("root")
    cfg = config.load(os.environ.get("COCOON_TEST_CONFIG") or None)
    q = dataclasses.replace(cfg.hypervisor.qemu, accel=os.environ.get("COCOON_TEST_ACCEL", "auto"))
    return dataclasses.replace(
        cfg,
        hypervisor=dataclasses.replace(cfg.hypervisor, qemu=q),
        runtime=dataclasses.replace(cfg.runtime, root=str(root)),
    )


@pytest.fixture(scope="session")
def image(base_config):
    """The guest image (built if needed; cached by content hash across runs)."""
    from cocoon.image import build_for_config

    return build_for_config(base_config)


@pytest.fixture
def cfg(base_config, image) -> config.Config:
    return base_config


@pytest.fixture
def workdir(tmp_path) -> Path:
    # Short paths: unix sockets live here.
    return tmp_path
