"""crun, the OCI runtime inside the guest: command lines (pure) and calls through the reaper.

Every call is ``crun --root <root> --log <bundle>/crun.log --log-format json <command> ...``:
with ``--log`` crun writes its errors to the log file only, never to its stderr, which for
``create`` and ``exec`` is the container's own stderr pipe. A failure is reported with the
last ``"level":"error"`` line crun appended during the call (as containerd's runc shim does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cocoon.agent.reaper import Reaper
from cocoon.errors import NotFound, ProcessError
from cocoon.log import get_logger

log = get_logger("agent")

CRUN_TIMEOUT = 60.0


@dataclass(frozen=True)
class CrunConfig:
    """Where crun is and keeps its state; ``extra_args`` go before the command (host-mode tests).

    ``create`` always uses pivot_root(2), never ``--no-pivot``: the guest's init made ``/`` a
    mount with a parent (``init.attach_root``), which pivot_root needs.
    """

    binary: str = "crun"
    root: str = "/run/crun"
    extra_args: tuple[str, ...] = ()


def base_argv(cfg: CrunConfig, log_file: str | None) -> list[str]:
    argv = [cfg.binary, "--root", cfg.root]
    if log_file:
        argv += ["--log", log_file, "--log-format", "json"]
    return [*argv, *cfg.extra_args]


def create_argv(cfg: CrunConfig, cid: str, bundle: str, pid_file: str, *, console_socket: str | None = None,
                log_file: str | None = None) -> list[str]:
    argv = [*base_argv(cfg, log_file), "create", "--bundle", bundle, "--pid-file", pid_file]
    if console_socket:
        argv += ["--console-socket", console_socket]
    return [*argv, cid]


def exec_argv(cfg: CrunConfig, cid: str, process_file: str, pid_file: str, *, console_socket: str | None = None,
              log_file: str | None = None) -> list[str]:
    argv = [*base_argv(cfg, log_file), "exec", "--process", process_file, "--pid-file", pid_file, "-d"]
    if console_socket:
        argv += ["--console-socket", console_socket]
    return [*argv, cid]


def kill_argv(cfg: CrunConfig, cid: str, signal: int, *, all_processes: bool = False,
              log_file: str | None = None) -> list[str]:
    return [*base_argv(cfg, log_file), "kill", *(["--all"] if all_processes else []), cid, str(signal)]


def simple_argv(cfg: CrunConfig, command: str, cid: str, log_file: str | None = None) -> list[str]:
    """``start``, ``pause``, ``resume``, ``state``."""
    return [*base_argv(cfg, log_file), command, cid]


def delete_argv(cfg: CrunConfig, cid: str, *, force: bool = True, log_file: str | None = None) -> list[str]:
    return [*base_argv(cfg, log_file), "delete", *(["--force"] if force else []), cid]


def update_argv(cfg: CrunConfig, cid: str, resources_file: str, log_file: str | None = None) -> list[str]:
    return [*base_argv(cfg, log_file), "update", "--resources", resources_file, cid]


def last_error(log_text: str) -> str:
    """The message of the last error line of a crun JSON log (or the last non-empty line)."""
    last_line = ""
    message = ""
    for raw in log_text.splitlines():
        line = raw.strip()
        if not line:
            continue
        last_line = line
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            message = str(entry.get("msg", ""))
    return message or last_line


class Crun:
    """Runs crun commands for one agent (through its reaper: nothing else waits for children)."""

    def __init__(self, reaper: Reaper, cfg: CrunConfig | None = None) -> None:
        self.reaper = reaper
        self.cfg = cfg or CrunConfig()

    async def call(
        self,
        argv: Sequence[str],
        *,
        log_file: str,
        what: str,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        timeout: float = CRUN_TIMEOUT,
        **context: object,
    ) -> bytes:
        """Run one crun command; its stdout. ProcessError (NotFound if crun is missing) on failure."""
        try:
            start = os.path.getsize(log_file)
        except OSError:
            start = 0
        try:
            status, out, err = await self.reaper.run(argv, stdin=stdin, stdout=stdout, stderr=stderr,
                                                     timeout=timeout)
        except NotFound as exc:
            raise NotFound("crun not found", command=self.cfg.binary).add_context(**context) from exc
        if status != 0:
            message = ""
            try:
                with open(log_file, errors="replace") as f:
                    f.seek(start)
                    message = last_error(f.read())
            except OSError:
                pass
            message = message or err.decode(errors="replace").strip()[-400:] or f"exit status {status}"
            raise ProcessError(f"{what}: {message}", command=" ".join(argv), exit_code=status, **context)
        return out
