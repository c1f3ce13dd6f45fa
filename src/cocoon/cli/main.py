"""The `cocoon` command: parse, set up logging, forward to cocoon.cli.commands, map errors.

Failures exit 1 with one line on stderr (``cocoon: <what went wrong>``) and, when a
``--log`` file is given, an error line in that file (runc-compatible JSON with
``--log-format json``) for containerd's runc shim to surface.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

# Commands that only read state files: they log nothing on success, so the logging machinery
# (a tenth of their run time) is set up only if they fail.
READ_ONLY = frozenset({"state", "list"})
# Global flags the fast path understands (the value-taking ones); anything else goes to argparse.
_FAST_GLOBALS = {"--root": "root", "--log": "log", "--log-format": "log_format"}


def fast_args(argv: list[str]) -> SimpleNamespace | None:
    """``[--root R] [--log F] [--log-format X] [--debug] state ID`` or ``... list [-q] [-f table|json]``
    parsed by hand, or None for anything else (argparse then handles it, errors included).

    What runc clients poll most (containerd's shim and podman call ``state`` after each change) must
    not pay for argparse, which with gettext, locale and shutil is a fifth of the run time.
    """
    ns: dict[str, object] = {"root": None, "log": None, "log_format": None, "debug": False, "config": None}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        flag, eq, value = argv[i].partition("=")
        if flag in _FAST_GLOBALS:
            if not eq:
                i += 1
                if i == len(argv):
                    return None
                value = argv[i]
            ns[_FAST_GLOBALS[flag]] = value
        elif argv[i] == "--debug":
            ns["debug"] = True
        else:
            return None
        i += 1
    if ns["log_format"] not in (None, "text", "json", "logfmt"):
        return None
    rest = argv[i:]
    if len(rest) == 2 and rest[0] == "state" and not rest[1].startswith("-"):
        return SimpleNamespace(command="state", id=rest[1], **ns)
    if rest[:1] != ["list"]:
        return None
    quiet, fmt = False, "table"
    j = 1
    while j < len(rest):
        word = rest[j]
        if word in ("-q", "--quiet"):
            quiet = True
        elif word in ("-f", "--format") and j + 1 < len(rest):
            j += 1
            fmt = rest[j]
        elif word.startswith("--format="):
            fmt = word.partition("=")[2]
        else:
            return None
        j += 1
    if fmt not in ("table", "json"):
        return None
    return SimpleNamespace(command="list", quiet=quiet, format=fmt, **ns)


def _setup_logging(args: SimpleNamespace | argparse.Namespace) -> None:
    from cocoon import log

    # A log file gets info and up; a terminal only warnings (errors are printed once, below).
    level = "debug" if args.debug else ("info" if args.log else "warning")
    log.setup(level=level, fmt=args.log_format or "logfmt", path=args.log)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args: SimpleNamespace | argparse.Namespace | None = fast_args(words)
    if args is None:
        from cocoon.cli.parser import build_parser

        args = build_parser().parse_args(words)
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
