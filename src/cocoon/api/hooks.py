"""OCI lifecycle hooks, run on the host with the container's state JSON on stdin.

Where each runs in Cocoon (the container itself lives in the VM):

* ``prestart`` (legacy) and ``createRuntime`` - once the container's new network namespace
  exists (the monitor's own, at ``/proc/<state pid>/ns/net``), before the VM boots: what they
  put in that namespace (docker's libnetwork moves the container's veth there) is wired to the
  VM like a CNI plugin's namespace. Run in the host's network namespace, as runc does.
* ``createContainer`` - once the container is created in the guest, on the host (runc runs it
  in the container's mount namespace, which is inside the VM here; docs/containers.md).
* ``startContainer`` - not run here: it runs in the container's namespaces, which are in the
  guest, so it stays in the guest's spec (:func:`cocoon.storage.shared.plan`) and crun runs it
  after start, before the user process (its path resolves in the container's rootfs).
* ``poststart`` - after the user process started; a failure is logged, not fatal.
* ``poststop`` - at ``delete``; a failure is logged, not fatal.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from typing import Any

from cocoon.errors import ProcessError
from cocoon.log import get_logger
from cocoon.oci.model import Hook

log = get_logger("api")


def run_hooks(kind: str, hooks: Iterable[Hook], state: dict[str, Any], *, fatal: bool = True) -> None:
    """Run ``hooks`` in order; a failing hook raises ProcessError (or is logged when not ``fatal``)."""
    payload = json.dumps(state).encode()
    for hook in hooks:
        argv = list(hook.args) or [hook.path]
        env = dict(item.split("=", 1) for item in hook.env if "=" in item)
        try:
            proc = subprocess.run(
                argv,
                executable=hook.path,
                input=payload,
                capture_output=True,
                env=env,
                timeout=hook.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            err = ProcessError(f"{kind} hook timed out", command=hook.path, timeout=hook.timeout)
            _fail(err, fatal, exc)
            continue
        except OSError as exc:
            err = ProcessError(f"{kind} hook cannot run: {exc.strerror}", command=hook.path)
            _fail(err, fatal, exc)
            continue
        if proc.returncode != 0:
            err = ProcessError(
                f"{kind} hook failed",
                command=hook.path,
                exit_code=proc.returncode,
                stderr=proc.stderr.decode(errors="replace").strip()[-300:],
            )
            _fail(err, fatal, None)
        else:
            log.debug("hook ran", kind=kind, command=hook.path)


def _fail(err: ProcessError, fatal: bool, cause: BaseException | None) -> None:
    if fatal:
        raise err from cause
    log.warning(str(err))
