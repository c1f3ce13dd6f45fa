"""Host-side storage for sandboxes: what the guest mounts (virtio-fs shares, later block devices)."""
