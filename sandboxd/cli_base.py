"""What every sandboxctl command shares: exit codes, terminal-safe text, the error path, the
client and JSON output. Its own module so that command modules (cli.py, cli_code.py) need not
import each other."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import IO, Any, NoReturn

import click

from . import errors, protocol
from .client import Client

# Exit codes of sandboxctl itself. `exec`/`sh` exit with the command's own code instead, so these
# can collide with it; use `--json` when you must tell them apart.
EXIT_OK = 0
EXIT_ERROR = 1  # the daemon answered with an error (one line on stderr names it)
EXIT_USAGE = 2  # bad command line (click's own convention)
EXIT_UNREACHABLE = 69  # no daemon at the socket (sysexits EX_UNAVAILABLE)
EXIT_TIMEOUT = 124  # the command hit --timeout (the convention of timeout(1))
EXIT_INTERRUPTED = 130  # ^C

EXIT_CODES_HELP = f"""\b
Exit codes:
  {EXIT_OK}    success
  {EXIT_ERROR}    the daemon reported an error (printed on stderr)
  {EXIT_USAGE}    usage error
  {EXIT_UNREACHABLE}   the daemon is unreachable (no socket, refused, connection lost)
  {EXIT_TIMEOUT}  exec/sh: the command timed out
  {EXIT_INTERRUPTED}  interrupted
  exec/sh otherwise exit with the command's own exit code (128+N if killed by signal N).
"""

#: exec and sh: the exit code of each verdict (docs/limits.md, "Exit codes").
EXEC_EXIT_CODES_HELP = EXIT_CODES_HELP + f"""
\b
Exit codes of exec/sh by verdict (a line on stderr names the limit that ended it):
  OK  0
  RE  the command's own code
  SG  128+N, N the signal (SIGSEGV: 139)
  TO  {EXIT_TIMEOUT}, for --timeout and --cpu-time
  ML  137 (the OOM killer's SIGKILL; a shell whose child it killed: 137 too)
  OL  137 (killed at the cap), or 141 / the command's code if EPIPE stopped it first
  XX  {EXIT_ERROR} (the sandbox failed, not the command)
"""


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_CONTROL[ord("\\")] = "\\\\"


def safe(text: object) -> str:
    """Metadata for a terminal (L1): file names, room ids, error messages come from the daemon
    and the rooms, and a newline or an escape sequence in them would forge lines or retitle the
    terminal. Control characters (C0, DEL, C1) become \\xNN, backslashes are doubled; program
    output streamed by exec/sh/read is the program's own and is written raw."""
    return str(text).translate(_CONTROL)


def _fail(err: errors.SandboxError) -> NoReturn:
    code = err.code
    click.echo(f"sandboxctl: error: {safe(err.message)}" + (f" [{safe(code)}]" if code else ""),
               err=True)
    sys.exit(EXIT_UNREACHABLE if isinstance(err, errors.DaemonUnreachable) else EXIT_ERROR)


def _run(fn: Callable[[], int | None]) -> NoReturn:
    """Run a command body: SandboxError -> one line and its exit code; ^C -> 130."""
    try:
        rc = fn()
    except errors.SandboxError as err:
        _fail(err)
    except KeyboardInterrupt:
        click.echo("sandboxctl: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(rc or 0)


def _client(ctx: click.Context) -> Client:
    obj: dict[str, Any] = ctx.ensure_object(dict)
    return Client(obj.get("socket"), obj.get("timeout"))


def _wire_json(value: Any) -> Any:
    """Results as the daemon sent them (unknown fields included), anything else as text."""
    return value.raw if isinstance(value, protocol.Result) else str(value)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=_wire_json))




# --- progress of long operations ----------------------------------------------------------------


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB": progress figures (not limits, which keep their exact sizes)."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class Progress:
    """Bytes and rate of a long operation (``cp``), on stderr and only when stderr is a
    terminal: one line redrawn in place at most ``every`` seconds, and by :meth:`finish` a last
    one with the total and the time taken, ended by a newline. Elsewhere (a pipe, a log, a
    test's capture) it writes nothing, so scripts see only the command's summary line."""

    def __init__(self, what: str, stream: IO[str] | None = None, every: float = 0.1) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.every = every
        self.started = time.monotonic()
        self.last = float("-inf")
        self.done = 0

    def _line(self, final: bool) -> str:
        took = max(time.monotonic() - self.started, 1e-6)
        rate = f"{human_bytes(self.done / took)}/s"
        if final:
            return f"sandboxctl: {self.what}: {human_bytes(self.done)} in {took:.1f} s ({rate})"
        return f"sandboxctl: {self.what}: {human_bytes(self.done)} ({rate})"

    def __call__(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if not self.enabled or now - self.last < self.every:
            return
        self.last = now
        self.stream.write("\r\x1b[K" + self._line(False))  # back to the column 0, clear the line
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K" + self._line(True) + "\n")
            self.stream.flush()
