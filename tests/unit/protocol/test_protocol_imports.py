"""cocoon.protocol runs in the guest's minimal Python: stdlib, google.protobuf, cocoon.errors/log only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PROTOCOL = Path(__file__).resolve().parents[3] / "src" / "cocoon" / "protocol"
ALLOWED_COCOON = ("cocoon.errors", "cocoon.log", "cocoon.protocol")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] if node.module != "cocoon" else [f"cocoon.{a.name}" for a in node.names]
    return names


def test_protocol_imports_only_what_the_guest_has():
    bad = []
    sources = [p for p in PROTOCOL.rglob("*.py") if "gen" not in p.relative_to(PROTOCOL).parts]
    assert len(sources) > 10
    for path in sources:
        for name in _imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or name.startswith("google.protobuf"):
                continue
            if name.startswith(ALLOWED_COCOON):
                continue
            bad.append(f"{path.relative_to(PROTOCOL)}: {name}")
    assert not bad, bad


def test_generated_code_imports_only_protobuf_and_itself():
    for path in (PROTOCOL / "gen").rglob("*_pb2.py"):
        for name in _imports(path):
            assert name.startswith(("google.protobuf", "cocoon.protocol.gen")), f"{path}: {name}"
