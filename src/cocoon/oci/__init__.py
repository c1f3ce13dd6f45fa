"""The OCI runtime spec as Cocoon reads it.

``cocoon.oci.spec``: a bundle's config.json loaded into frozen dataclasses (``load``), plus the raw
dict the guest gets. ``cocoon.oci.defaults``: ``default_spec()`` (``cocoon spec``) and ``features()``
(``cocoon features``). Standard library only: this is on the fast path of the CLI.
"""
