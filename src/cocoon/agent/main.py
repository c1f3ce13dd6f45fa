"""Guest agent main: early init, then serve the agent API over the agent channel.

Placeholder until the service lands: prints the ready marker so the image can be boot-tested.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from cocoon.agent import init

    init.setup()
    print("COCOON-AGENT-READY", file=sys.stderr, flush=True)
    init.poweroff()
    return 0
