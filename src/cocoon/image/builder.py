"""Build the guest image (kernel + initrd), cached by the content hash of every input.

``build_image()`` computes the plan (which host files go where), hashes it together with the
options and the builder's own source, and returns the cached build under
``<cache_dir>/<hash>/`` when it exists. Otherwise it renders the initrd, extracts vmlinux, writes
everything into a temporary directory next to the cache entry and renames it into place, then
repoints ``<cache_dir>/current``. Two builds of the same inputs give identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from cocoon.errors import CocoonError, ImageError, NotFound
from cocoon.image import kernel as kern
from cocoon.image import layout, pyclosure
from cocoon.image.cache import DEFAULT_CACHE_DIR, Image, cache_dir_of, load, point_current
from cocoon.image.layout import Plan
from cocoon.log import get_logger
from cocoon.util.proc import run

log = get_logger("image")

BUILDER_VERSION = "1"

# What the guest needs from the kernel, by module name, in the order to ask for them.
REQUIRED_MODULES: tuple[str, ...] = (
    "virtio_mmio", "virtio_pci", "virtio_console", "virtio_blk", "virtio_net",
    "vsock", "vmw_vsock_virtio_transport", "fuse", "virtiofs", "overlay",
)
# Loaded when the kernel has them (the cloud kernel has no 9p at all).
OPTIONAL_MODULES: tuple[str, ...] = ("9pnet", "9pnet_virtio", "9p")

# protobuf modules the guest gets even when nothing imports them yet: what generated *_pb2
# modules use, and the well-known types.
PROTOBUF_MODULES: tuple[str, ...] = (
    "google.protobuf.descriptor_pool", "google.protobuf.internal.builder",
    "google.protobuf.runtime_version", "google.protobuf.symbol_database", "google.protobuf.message",
    "google.protobuf.any_pb2", "google.protobuf.duration_pb2", "google.protobuf.empty_pb2",
    "google.protobuf.field_mask_pb2", "google.protobuf.struct_pb2", "google.protobuf.timestamp_pb2",
    "google.protobuf.wrappers_pb2",
)


class Compression(StrEnum):
    """How the initrd is compressed (the kernel unpacks either)."""

    NONE = "none"
    GZIP = "gzip"


class ProtobufImpl(StrEnum):
    """protobuf's message implementation in the guest: the upb C extension or pure Python."""

    UPB = "upb"
    PYTHON = "python"


def _default_protobuf_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("google.protobuf")
    if spec is None or not spec.submodule_search_locations:
        raise NotFound("the protobuf package is not installed", package="protobuf")
    return Path(next(iter(spec.submodule_search_locations))).parent.parent


@dataclass(frozen=True)
class ImageOptions:
    """Inputs of a build; ``None`` paths are found on the host (newest cloud kernel, venv protobuf)."""

    kernel: Path | None = None
    modules_dir: Path | None = None
    busybox: Path = Path("/bin/busybox")
    python: Path = Path("/usr/bin/python3.11")
    crun: Path | None = Path("/usr/bin/crun")
    protobuf_root: Path | None = None
    cocoon_src: Path = Path(__file__).resolve().parent.parent
    compression: Compression = Compression.NONE
    protobuf_impl: ProtobufImpl = ProtobufImpl.UPB
    extract_vmlinux: bool = True
    optimize: int = 0
    strip_module_signatures: bool = True
    modules: tuple[str, ...] = REQUIRED_MODULES
    optional_modules: tuple[str, ...] = OPTIONAL_MODULES
    python_modules: tuple[str, ...] = pyclosure.RUNTIME_MODULES


def _builder_sources() -> dict[str, str]:
    here = Path(__file__).resolve().parent
    files = sorted(here.glob("*.py"))
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def make_plan(opts: ImageOptions) -> tuple[Plan, kern.KernelInfo]:
    """Decide every file of the initrd (runs the guest python for the import closure, and ldd)."""
    if opts.kernel is not None:
        release = opts.kernel.name.removeprefix("vmlinuz-")
        mods = opts.modules_dir or Path("/lib/modules") / release
        info = kern.KernelInfo(opts.kernel, release, mods)
    else:
        info = kern.find_kernel()
        if opts.modules_dir is not None:
            info = kern.KernelInfo(info.bzimage, info.release, opts.modules_dir)
    for path, what in ((info.bzimage, "kernel"), (opts.busybox, "busybox"), (opts.python, "python")):
        if not path.is_file():
            raise NotFound(f"{what} not found", path=str(path))
    plan = Plan()
    layout.add_base(plan, opts.protobuf_impl.value)
    layout.add_modules(plan, info.modules_dir, info.release, opts.modules, opts.optional_modules,
                       strip_signatures=opts.strip_module_signatures)
    applets = run([opts.busybox, "--list-full"]).stdout.decode().splitlines()
    binaries = [opts.python]
    layout.add_elf(plan, opts.python, "usr/bin/python3.11")
    plan.link("usr/bin/python3", "python3.11")
    if opts.crun is not None:
        if not opts.crun.is_file():
            raise NotFound("crun not found", path=str(opts.crun))
        layout.add_elf(plan, opts.crun, "usr/bin/crun")
        binaries.append(opts.crun)
    _add_python(plan, opts, binaries)
    layout.add_busybox(plan, opts.busybox, applets)
    plan.info["libraries"] = layout.add_libraries(plan, binaries)
    return plan, info


def _add_python(plan: Plan, opts: ImageOptions, binaries: list[Path]) -> None:
    src = opts.cocoon_src.parent  # the directory holding the cocoon package
    pb_root = opts.protobuf_root or _default_protobuf_root()
    cocoon_files: list[tuple[str, Path]] = []
    for part in layout.COCOON_PARTS:
        if (opts.cocoon_src / part).exists():
            cocoon_files.extend(layout.iter_py(src, f"cocoon/{part}"))
    entries = sorted({n for n, _ in cocoon_files if not n.endswith("__main__")})
    closure = pyclosure.import_closure(
        opts.python, [src, pb_root], entries, [*PROTOBUF_MODULES, *opts.python_modules],
        env={"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": opts.protobuf_impl.value},
    )
    if closure.failed:
        raise ImageError("guest python cannot import the agent", failed=json.dumps(closure.failed))
    known = {n for n, _ in cocoon_files}
    pb_files: list[tuple[str, Path]] = []
    for name, origin in sorted(closure.others.items()):
        if not origin or not origin.endswith(".py"):
            continue
        if (name == "cocoon" or name.startswith("cocoon.")) and name not in known:
            # Another cocoon module the agent pulls in (a helper in cocoon.util, say) comes along.
            cocoon_files.append((name, Path(origin)))
        elif name.startswith("google.") and origin.startswith(f"{pb_root}/"):
            pb_files.append((name, Path(origin)))
    if opts.protobuf_impl is ProtobufImpl.UPB:
        upb = closure.others.get("google._upb._message")
        if not upb:
            raise NotFound("protobuf upb extension not importable", path=str(pb_root / "google" / "_upb"))
        plan.add(f"{layout.GUEST_COCOON}/google/_upb/{Path(upb).name}", Path(upb), 0o755)
        binaries.append(Path(upb))

    plan.python, plan.optimize = opts.python, opts.optimize
    for name, path in sorted(closure.sources.items()):
        dfile = f"/usr/lib/python3.11/{path.relative_to(closure.stdlib_dir)}"
        plan.add_pyc(pyclosure.pyc_name(name, path), path, dfile, zip_file=layout.GUEST_STDLIB_ZIP)
    for root, files in ((src, cocoon_files), (pb_root, pb_files)):
        for name, path in sorted(files):
            rel = path.relative_to(root)
            plan.add_pyc(f"{layout.GUEST_COCOON}/{pyclosure.pyc_name(name, path)}", path,
                         f"{layout.GUEST_COCOON}/{rel}")
    for _name, path in sorted(closure.extensions.items()):
        plan.add(f"{layout.GUEST_DYNLOAD}/{path.name}", path, 0o755)
        binaries.append(path)
    plan.info["python"] = {
        "version": ".".join(map(str, closure.version)),
        "stdlib_modules": sorted(closure.sources),
        "extensions": sorted(closure.extensions),
        "protobuf_impl": opts.protobuf_impl.value,
    }


def _options_for_key(opts: ImageOptions) -> dict[str, Any]:
    d = asdict(opts)
    for k in ("kernel", "modules_dir", "busybox", "python", "crun", "protobuf_root", "cocoon_src"):
        d.pop(k)  # host paths do not matter, their content (in the plan) does
    return {"options": d, "builder_version": BUILDER_VERSION, "builder": _builder_sources()}


def _compress(data: bytes, compression: Compression) -> bytes:
    if compression is Compression.GZIP:
        import gzip

        return gzip.compress(data, compresslevel=6, mtime=0)
    return data


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def options_from_config(cfg: object) -> tuple[ImageOptions, Path]:
    """ImageOptions and cache directory from a Config's ``[image]`` section (duck-typed)."""
    image_cfg = getattr(cfg, "image", cfg)
    kernel = getattr(image_cfg, "kernel", "") or None
    opts = ImageOptions(kernel=Path(kernel) if kernel else None,
                        compression=Compression(getattr(image_cfg, "compression", "none")))
    return opts, cache_dir_of(cfg)


def build_for_config(cfg: object, *, force: bool = False) -> Image:
    """:func:`build_image` with the options of a Config's ``[image]`` section."""
    opts, cache_dir = options_from_config(cfg)
    return build_image(opts, cache_dir=cache_dir, force=force)


def build_image(options: ImageOptions | None = None, *,
                cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR, force: bool = False) -> Image:
    """Build (or find in the cache) the guest kernel + initrd for ``options``.

    Returns the :class:`Image`; ``cached`` tells whether it was already there. ``force`` rebuilds
    even on a cache hit (the result replaces the cached entry).
    """
    opts = options or ImageOptions()
    cache = Path(cache_dir)
    t0 = time.monotonic()
    try:
        plan, kinfo = make_plan(opts)
        key = plan.digest({**_options_for_key(opts), "kernel": hashlib.sha256(
            kinfo.bzimage.read_bytes()).hexdigest()})
    except CocoonError as exc:
        raise exc.add_context(step="plan image") from None
    final = cache / key
    if not force and (final / "manifest.json").is_file():
        point_current(cache, key)
        image = load(final, cached=True)
        log.info("image cached", key=key[:16], ms=round((time.monotonic() - t0) * 1000))
        return image
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key[:16]}-", dir=cache))
    try:
        manifest = _build_into(tmp, plan, kinfo, opts, key)
        if force and final.exists():
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp)  # a concurrent build of the same key won: its bytes are ours
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    point_current(cache, key)
    log.info("image built", key=key[:16], initrd=manifest["initrd"]["size"],
             ms=round((time.monotonic() - t0) * 1000))
    return load(final, cached=False)


def _build_into(out: Path, plan: Plan, kinfo: kern.KernelInfo, opts: ImageOptions,
                key: str) -> dict[str, Any]:
    bz = kinfo.bzimage.read_bytes()
    _write(out / "bzImage", bz)
    vmlinux_info: dict[str, Any] | None = None
    if opts.extract_vmlinux:
        try:
            elf = kern.extract_vmlinux(bz)
        except CocoonError as exc:
            log.warning("no vmlinux, microvm will boot the bzImage", error=str(exc))
        else:
            _write(out / "vmlinux", elf)
            vmlinux_info = {"size": len(elf), "sha256": hashlib.sha256(elf).hexdigest(),
                            "pvh_entry": hex(kern.pvh_entry(elf) or 0)}
    plan.add("etc/cocoon/image.json", json.dumps(
        {"key": key, "kernel": kinfo.release, "builder_version": BUILDER_VERSION},
        sort_keys=True).encode() + b"\n")
    archive = plan.render()
    raw = archive.to_bytes()
    initrd = _compress(raw, opts.compression)
    _write(out / "initrd", initrd)
    manifest: dict[str, Any] = {
        "key": key,
        "builder_version": BUILDER_VERSION,
        "kernel": {"release": kinfo.release, "source": str(kinfo.bzimage),
                   "bzImage": {"size": len(bz), "sha256": hashlib.sha256(bz).hexdigest()},
                   "vmlinux": vmlinux_info},
        "initrd": {"size": len(initrd), "sha256": hashlib.sha256(initrd).hexdigest(),
                   "compression": opts.compression.value, "uncompressed_size": len(raw),
                   "entries": len(archive)},
        **plan.info,
        "contents": [{"path": "/" + e.path, "kind": e.kind, "size": len(e.data)}
                     for e in archive.entries()],
    }
    _write(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")
    os.chmod(out, 0o755)  # noqa: S103 - images are readable by every user that runs a VM
    return manifest
