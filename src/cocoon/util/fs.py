"""Small filesystem helpers shared by the host side."""

from __future__ import annotations

import contextlib
import os
import time


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: a temp file in the same directory, fsync, rename.

    Readers see the old content or the new one, never a torn file; a failure leaves no temp file.
    FileNotFoundError if the directory does not exist.
    """
    # os.path, not pathlib: `cocoon state` reaches this module and pays for every import.
    head, name = os.path.split(os.fspath(path))
    raw = data.encode() if isinstance(data, str) else data
    tmp = os.path.join(head, f".{name}.{os.getpid()}.{time.monotonic_ns()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)  # replaces an existing file (POSIX rename)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
