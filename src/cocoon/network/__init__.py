"""The pod's network on the host: find what the CNI made in a namespace, wire it to the VM.

``discover(netns)`` reads interfaces, addresses, routes and neighbours (pyroute2);
``wired(info, model)`` creates a tap (``tcfilter``) or macvtap per interface and yields the fds
the VMM gets. Both block: run them in a worker thread. The guest side is
:mod:`cocoon.agent.network`; the sandbox glue is :mod:`cocoon.api.pod_network`. See
docs/networking.md.
"""

from __future__ import annotations

from cocoon.network.discover import PodNetworkInfo, discover
from cocoon.network.wiring import MODELS, WiredInterface, wired, wired_one

__all__ = ["MODELS", "PodNetworkInfo", "WiredInterface", "discover", "wired", "wired_one"]
