"""Run every benchmark in turn (make bench). Each prints its own table with ratios against its peer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("bench_ttrpc.py", "bench_boot.py", "bench_containers.py", "bench_pods.py")


def main() -> int:
    failed = 0
    for name in BENCHES:
        print(f"=== {name}", flush=True)
        failed += subprocess.run([sys.executable, str(HERE / name)], check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
