"""The guest's side of VM templating: quiesce before a save, fresh randomness after a restore.

A template VM is saved once and restored many times; every clone wakes up with the template's
memory, so with the same kernel CRNG state. ``reseed_random`` mixes host bytes into the input
pool with ``RNDADDENTROPY`` (credited) and forces a CRNG reseed with ``RNDRESEEDCRNG``, so clones
never hand out the same random numbers.
"""

from __future__ import annotations

import fcntl
import os
import struct

from cocoon.errors import InvalidArgument, ProcessError
from cocoon.log import get_logger

log = get_logger("agent")

# linux/random.h
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MIN_SEED_BYTES = 16
MAX_SEED_BYTES = 4096


def entropy_request(data: bytes) -> bytes:
    """The ``struct rand_pool_info`` RNDADDENTROPY takes: entropy bits, size, the bytes."""
    return struct.pack("ii", len(data) * 8, len(data)) + data


def reseed_random(data: bytes, device: str = "/dev/random") -> None:
    """Credit ``data`` to the kernel's pool and reseed its CRNG (needs CAP_SYS_ADMIN: PID 1 has it)."""
    if not MIN_SEED_BYTES <= len(data) <= MAX_SEED_BYTES:
        raise InvalidArgument("seed size out of range", field="data", size=len(data),
                              min=MIN_SEED_BYTES, max=MAX_SEED_BYTES)  # fmt: skip
    try:
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ProcessError(f"open {device}: {exc.strerror}", path=device, errno=exc.errno) from exc
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, entropy_request(data))
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError as exc:
        raise ProcessError(f"reseed {device}: {exc.strerror}", path=device, errno=exc.errno) from exc
    finally:
        os.close(fd)
    log.info("random pool reseeded", bytes=len(data))
