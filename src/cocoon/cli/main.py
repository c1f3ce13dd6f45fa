"""The `cocoon` command: parse, set up logging, forward to cocoon.cli.commands, map errors.

Failures exit 1 with one line on stderr (``cocoon: <what went wrong>``) and, when a
``--log`` file is given, an error line in that file (runc-compatible JSON with
``--log-format json``) for containerd's runc shim to surface.
"""

from __future__ import annotations

import argparse
import sys

from cocoon.cli.parser import build_parser

# Commands that only read state files: they log nothing on success, so the logging machinery
# (a tenth of their run time) is set up only if they fail.
READ_ONLY = frozenset({"state", "list"})


def _setup_logging(args: argparse.Namespace) -> None:
    from cocoon import log

    # A log file gets info and up; a terminal only warnings (errors are printed once, below).
    level = "debug" if args.debug else ("info" if args.log else "warning")
    log.setup(level=level, fmt=args.log_format or "logfmt", path=args.log)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in READ_ONLY:
        _setup_logging(args)
    from cocoon.cli import commands
    from cocoon.errors import CocoonError

    handler = getattr(commands, "cmd_" + args.command.replace("-", "_"))
    try:
        return int(handler(args))
    except CocoonError as exc:
        if args.log:
            if args.command in READ_ONLY:
                _setup_logging(args)
            from cocoon import log

            context = {k: v for k, v in exc.context.items() if k != "console_tail"}
            log.get_logger("cli").error(str(exc).splitlines()[0], **context)
        print(f"cocoon: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
