"""The README's main job: a busybox container run in its own VM, start to finish."""

from __future__ import annotations

import os
import sys
import tempfile
import time

from cocoon.api import container
from cocoon.api.bundle import make_bundle
from cocoon.config import Config

DEMO_SCRIPT = (
    'echo "hello from a container in a VM"; '
    'echo "kernel:   $(uname -r)"; '
    'echo "hostname: $(hostname)"; '
    'echo "uid:      $(id -u)"; '
    'echo "memory:   $(head -1 /proc/meminfo)"'
)


def run_demo(cfg: Config) -> int:
    """Make a busybox bundle, ``run`` it (create + start + wait + delete), report the timing."""
    root = cfg.runtime.root
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cocoon-demo-") as tmp:
        bundle = make_bundle(tmp, ["sh", "-c", DEMO_SCRIPT])
        cid = f"demo-{os.getpid()}"
        started = time.monotonic()
        status = container.run(cfg, cid, str(bundle))
        elapsed = time.monotonic() - started
    print(f"container exited with status {status} after {elapsed:.2f} s (create + start + run + delete)")
    sys.stdout.flush()
    return status
