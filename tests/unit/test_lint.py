"""The linters are part of the suite: ruff on everything, mypy --strict on the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (make deps installs it)")
    return found


def test_ruff_clean():
    paths = ["src", "tests", "benchmarks", "examples"]
    out = subprocess.run([_tool("ruff"), "check", *paths], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout[-4000:]


def test_mypy_strict_clean():
    out = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True, check=False, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:]


def test_generated_code_not_hand_edited_and_modules_small():
    big = []
    for path in (ROOT / "src" / "cocoon").rglob("*.py"):
        if "gen" in path.relative_to(ROOT / "src" / "cocoon").parts:
            continue
        lines = len(path.read_text().splitlines())
        if lines > 650:
            big.append((str(path.relative_to(ROOT)), lines))
    assert not big, f"modules over ~600 lines want splitting: {big}"
