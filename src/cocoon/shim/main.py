"""``containerd-shim-cocoon-v2``: containerd's runtime v2 shim contract, parsed and forwarded.

    containerd-shim-cocoon-v2 -namespace NS -address A -publish-binary P -id ID [-bundle B] [-debug] start
    containerd-shim-cocoon-v2 -namespace NS -address A -publish-binary P -id ID -bundle B delete
    containerd-shim-cocoon-v2 -namespace NS -id ID ...            (no action: the long-lived shim)

Flags are Go-style (one dash; ``-flag value`` or ``-flag=value``). ``start`` prints the shim's
address; ``delete`` prints a ``containerd.task.v2.DeleteResponse`` (protobuf bytes). Failures exit
1 with ``containerd-shim-cocoon-v2: <error>`` on stderr, which containerd shows its user.
"""

from __future__ import annotations

import argparse
import sys

NAME = "containerd-shim-cocoon-v2"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=NAME, description="Cocoon's containerd shim v2 (one VM per pod)")
    for flag in ("namespace", "id", "address", "publish-binary", "bundle", "socket"):
        p.add_argument(f"-{flag}", f"--{flag}", dest=flag.replace("-", "_"), default="")
    p.add_argument("-debug", "--debug", action="store_true")
    p.add_argument("-v", "-version", "--version", dest="version", action="store_true")
    p.add_argument("action", nargs="?", choices=("start", "delete"), default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args([a.replace("=true", "") if a.startswith("-debug") else a
                                      for a in (sys.argv[1:] if argv is None else argv)])  # fmt: skip
    if args.version:
        from cocoon import __version__

        print(f"{NAME}:\n  Version: {__version__}")
        return 0
    from cocoon import config, log
    from cocoon.errors import CocoonError
    from cocoon.shim import daemon, launcher

    opts = launcher.Options(namespace=args.namespace, id=args.id, address=args.address,
                            publish_binary=args.publish_binary, bundle=args.bundle, debug=args.debug)  # fmt: skip
    try:
        if not args.namespace:
            raise CocoonError("shim namespace cannot be empty")
        if not args.id:
            raise CocoonError("shim id cannot be empty")
        cfg = config.load()
        if args.action is None:
            return daemon.run(cfg, opts)
        # start/delete: containerd 1.6 reads start's stdout and stderr as one (the address): nothing
        # but errors may be written there.
        log.setup(level="error", fmt="json")
        if args.action == "start":
            sys.stdout.write(launcher.start(cfg, opts))
            return 0
        status, exited_at = launcher.delete(cfg, opts)
        from cocoon.protocol.gen.containerd.task.v2 import shim_pb2
        from cocoon.shim.events import timestamp

        response = shim_pb2.DeleteResponse(exit_status=status, exited_at=timestamp(exited_at))
        sys.stdout.buffer.write(response.SerializeToString())
        return 0
    except CocoonError as exc:
        print(f"{NAME}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
