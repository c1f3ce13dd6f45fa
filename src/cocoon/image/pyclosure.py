"""The guest Python: which stdlib modules the agent imports, compiled to deterministic .pyc.

Both steps run *the guest's* interpreter (Debian's ``/usr/bin/python3.11``) in a subprocess:
the import closure then reflects that interpreter's built-in modules, and the bytecode carries
its magic number. Compilation uses ``PYTHONHASHSEED=0`` (frozenset constants are marshalled in
hash order) and ``UNCHECKED_HASH`` pycs (no source mtime inside, never re-validated), so the same
sources always give the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cocoon.errors import ImageError
from cocoon.util.proc import run

# Imported on top of the agent's own modules: what the agent service is expected to use at run
# time even if no module imports it at load time (lazy imports, subprocess pipes, ...).
RUNTIME_MODULES: tuple[str, ...] = (
    "asyncio", "asyncio.unix_events", "base64", "collections", "contextlib", "contextvars", "copy",
    "ctypes", "dataclasses", "datetime", "encodings.ascii", "encodings.latin_1", "encodings.utf_8",
    "enum", "errno", "fcntl", "functools", "hashlib", "io", "ipaddress", "json", "logging", "os",
    "pathlib", "pty", "random", "re", "select", "selectors", "shlex", "shutil", "signal", "socket",
    "stat", "string", "struct", "subprocess", "tempfile", "termios", "threading", "time", "traceback",
    "tty", "typing", "uuid", "weakref",
)

# Left out of the guest: optional imports with a fallback that pull in big libraries
# (OpenSSL for ssl/_hashlib, liblzma, libbz2). hashlib falls back to the built-in digests.
EXCLUDED_MODULES: tuple[str, ...] = ("ssl", "_ssl", "_hashlib", "bz2", "_bz2", "lzma", "_lzma", "_uuid")

_CLOSURE_SCRIPT = r"""
import importlib, json, os, sys
paths, entries, optional, excluded = json.loads(sys.argv[1])
sys.path[:0] = paths
for name in excluded:
    sys.modules[name] = None  # makes "import name" raise ImportError, as in the guest
failed = {}
for name in entries + optional:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if name in entries or getattr(exc, "name", None) != name:
            failed[name] = f"{type(exc).__name__}: {exc}"
mods = {}
for name, mod in sorted(sys.modules.items()):
    spec = getattr(mod, "__spec__", None)
    origin = getattr(spec, "origin", None) if spec else None
    is_pkg = bool(spec and spec.submodule_search_locations is not None)
    mods[name] = [origin if isinstance(origin, str) else None, is_pkg]
json.dump({"modules": mods, "failed": failed, "stdlib": os.path.dirname(os.__file__),
           "version": list(sys.version_info[:3])}, sys.stdout)
"""

_COMPILE_SCRIPT = r"""
import json, py_compile, sys
outdir, optimize, jobs = json.load(sys.stdin)
for i, (src, dfile) in enumerate(jobs):
    py_compile.compile(src, cfile=f"{outdir}/{i}.pyc", dfile=dfile, doraise=True, optimize=optimize,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


@dataclass(frozen=True)
class Closure:
    """The modules an interpreter loaded: stdlib sources, extension files, and what failed."""

    stdlib_dir: Path
    sources: dict[str, Path]  # module name -> .py file inside the stdlib (packages: __init__.py)
    extensions: dict[str, Path]  # module name -> lib-dynload .so
    failed: dict[str, str]
    version: tuple[int, int, int]
    others: dict[str, str | None] = field(default_factory=dict)  # non-stdlib name -> origin


def import_closure(
    python: str | os.PathLike[str],
    paths: Sequence[str | os.PathLike[str]],
    entries: Sequence[str],
    optional: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    excluded: Sequence[str] = EXCLUDED_MODULES,
) -> Closure:
    """Import ``entries`` (and ``optional``, if importable) with ``python``; collect the stdlib used.

    ``paths`` go first on ``sys.path`` (the cocoon sources, the protobuf package). A failed
    entry import is reported in ``failed`` rather than raised: the caller decides.
    """
    arg = json.dumps([[os.fspath(p) for p in paths], list(entries), list(optional), list(excluded)])
    proc = run([python, "-S", "-s", "-P", "-B", "-c", _CLOSURE_SCRIPT, arg], env=dict(env or {}),
               timeout=120)
    try:
        info = json.loads(proc.stdout)
    except ValueError as exc:
        raise ImageError("import closure: bad output", output=proc.stdout[-200:]) from exc
    stdlib = Path(info["stdlib"])
    sources: dict[str, Path] = {}
    extensions: dict[str, Path] = {}
    others: dict[str, str | None] = {}
    for name, (origin, _is_pkg) in info["modules"].items():
        if name in excluded:
            continue
        if not origin or not origin.startswith(str(stdlib) + "/"):
            others[name] = origin
            continue
        path = Path(origin)
        rel = path.relative_to(stdlib).parts
        if rel[0] in ("site-packages", "dist-packages"):
            others[name] = origin
            continue
        if path.suffix == ".py":
            sources[name] = path
        elif path.suffix == ".so":
            extensions[name] = path
    return Closure(stdlib, sources, extensions, dict(info["failed"]), tuple(info["version"]), others)


def compile_sources(python: str | os.PathLike[str], jobs: Sequence[tuple[Path, str]],
                    optimize: int = 0) -> list[bytes]:
    """Compile each ``(source file, name shown in tracebacks)`` to .pyc bytes with ``python``.

    ``optimize`` is the -O level baked into the bytecode (2 drops asserts and docstrings); a
    sourceless .pyc loads whatever level the interpreter runs at.
    """
    if not jobs:
        return []
    with tempfile.TemporaryDirectory(prefix="cocoon-pyc-") as tmp:
        payload = json.dumps([tmp, optimize, [[os.fspath(src), dfile] for src, dfile in jobs]]).encode()
        run([python, "-S", "-s", "-P", "-B", "-c", _COMPILE_SCRIPT], input=payload,
            env={"PYTHONHASHSEED": "0"}, timeout=300)
        return [Path(tmp, f"{i}.pyc").read_bytes() for i in range(len(jobs))]


def pyc_name(name: str, source: Path) -> str:
    """Archive path of a module's .pyc: ``a/b.pyc`` or ``a/b/__init__.pyc`` for a package."""
    parts = name.split(".")
    if source.name == "__init__.py":
        return "/".join(parts) + "/__init__.pyc"
    return "/".join(parts) + ".pyc"


def write_zip(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A deterministic stored (uncompressed) zip: sorted names, 1980-01-01 timestamps."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in sorted(members):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, data)
    return buf.getvalue()


def parse_ldd(output: str) -> list[str]:
    """Library paths from ``ldd`` output (``name => /path (addr)`` and ``/path (addr)`` lines)."""
    libs: list[str] = []
    for raw in output.splitlines():
        line = raw.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].strip().split(" (", 1)[0].strip()
            if target == "not found":
                raise ImageError("shared library not found", line=line)
        else:
            target = line.split(" (", 1)[0].strip()
        if target.startswith("/") and target not in libs:
            libs.append(target)
    return libs


def shared_libraries(binaries: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Every shared library (and the dynamic loader) the ELF ``binaries`` need, via ``ldd``."""
    out: list[str] = []
    for binary in binaries:
        proc = run(["ldd", os.fspath(binary)], check=False, timeout=30)
        text = proc.stdout.decode(errors="replace")
        if proc.returncode != 0:
            if "not a dynamic executable" in text + proc.stderr.decode(errors="replace"):
                continue
            raise ImageError("ldd failed", binary=os.fspath(binary), stderr=proc.stderr[-200:])
        for lib in parse_ldd(text):
            if lib not in out:
                out.append(lib)
    return sorted(out)
