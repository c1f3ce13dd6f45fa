"""containerd-shim-cocoon-v2: containerd's runtime v2 shim, one VM per pod, on the library API.

``main`` parses the flags; ``launcher`` runs ``start``/``delete``; ``daemon`` is the long-lived
shim serving ``service.TaskService`` over ttRPC; ``tasks`` and ``fifo_io`` hold per-process state
and stdio; ``events`` publishes to containerd. See docs/shim.md.
"""
