"""Cocoon: an OCI container runtime that runs every container or pod in its own lightweight VM."""

__version__ = "0.1.0"
