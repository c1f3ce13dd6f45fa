"""Cocoon's wire layer: ttrpc, the protobuf schemas, and typed clients.

* :mod:`cocoon.protocol.ttrpc` - containerd's ttRPC protocol on asyncio (server, client,
  transports: unix socket, vsock, virtio-serial character device).
* ``proto/`` - the schemas (agent API, containerd shim task v2 and events, ttrpc envelope);
  ``gen/`` - the classes ``scripts/genproto`` generates from them.
* :mod:`cocoon.protocol.types` / :mod:`cocoon.protocol.convert` - the dataclasses the rest
  of Cocoon uses, and the only place they meet the generated classes.
* :mod:`cocoon.protocol.agent_client` - the host's client of the guest agent.

This package runs in the guest too: it imports only the standard library,
``google.protobuf``, :mod:`cocoon.errors` and :mod:`cocoon.log`.
"""
