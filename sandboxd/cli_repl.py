"""sandboxctl repl: a code context at a prompt (issue 16, docs/contexts.md).

Added to ``cli.main`` by cli.py. Makes a context (createCodeContext) in the room, reads cells at
a ``>>>`` prompt (``...`` while the input is incomplete: Python by the host's ``codeop``, which
parses the same grammar as the room's python3 for everything a prompt is used for; JavaScript and
TypeScript by unclosed brackets or a trailing backslash), runs each with runInContext streaming
its logs and results, and deletes the context on the way out (end of input, ``exit``). ^C at the
prompt drops the line; during a cell it sends interruptCodeContext on a second connection (the
first one is waiting for the cell's answer).
"""

from __future__ import annotations

import codeop
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from . import protocol
from .cli_base import _client
from .client import Client

LANGS = ("python", "javascript", "typescript")


def _complete(lang: str, src: str) -> bool:
    """Whether ``src`` is a whole cell (run it) or needs more lines."""
    if lang == "python":
        if src.endswith("\n\n") or "\n" not in src.rstrip("\n"):
            try:
                return codeop.compile_command(src, "<cell>", "exec") is not None
            except (SyntaxError, ValueError, OverflowError):
                return True  # the kernel reports it
        return False  # a block goes on until an empty line
    if src.rstrip("\n").endswith("\\"):
        return False
    depth = 0
    quote = ""
    for ch in src:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
    return depth <= 0 and not quote


def _show_result(bundle: dict[str, Any]) -> None:
    text = bundle.get("text/plain")
    others = [k for k in bundle if k != "text/plain"]
    if text is not None:
        click.echo(text)
    for mime in others:
        if mime in ("image/png", "image/jpeg", "image/svg+xml"):
            click.echo(f"[{mime}, {len(str(bundle[mime]))} characters]")


def run_repl(client: Client, interrupter: Callable[[], Client], room: str, lang: str,
             timeout: float | None, read: Callable[[str], str]) -> int:
    sb = client.sandbox(room)
    info = sb.create_code_context(lang)
    cid = info.context_id
    click.echo(f"sandboxctl repl: {lang} context {cid} in {room} (exit or ^D to leave)", err=True)
    busy = False

    def on_sigint(_sig: int, _frame: Any) -> None:
        if not busy:
            raise KeyboardInterrupt
        with contextlib.suppress(Exception), interrupter() as other:
            other.sandbox(room).interrupt_code_context(cid)

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        while True:
            src = ""
            try:
                while True:
                    line = read(">>> " if not src else "... ")
                    src += line + "\n"
                    if _complete(lang, src):
                        break
            except KeyboardInterrupt:
                click.echo("", err=True)
                continue
            except EOFError:
                return 0
            if not src.strip():
                continue
            if src.strip() in ("exit", "exit()", "quit", "quit()", ".exit"):
                return 0
            busy = True
            try:
                res = sb.run_in_context(
                    cid, src, timeout=timeout,
                    on_output=lambda s, t: (sys.stderr if s == "stderr" else sys.stdout).write(t),
                    on_result=_show_result)
            finally:
                busy = False
            sys.stdout.flush()
            err = res.error
            if isinstance(err, protocol.ContextError):
                if err.traceback:
                    click.echo("\n".join(err.traceback), err=True)
                else:
                    click.echo(f"{err.name}: {err.value}", err=True)
    finally:
        signal.signal(signal.SIGINT, old)
        with contextlib.suppress(Exception):
            sb.delete_code_context(cid)


def _read(prompt: str) -> str:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    if sys.stdin.isatty():
        return input(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


@click.command()
@click.argument("room")
@click.option("--lang", "lang", type=click.Choice(LANGS), default="python", show_default=True)
@click.option("--timeout", type=float, default=None,
              help="seconds per cell (default: the daemon's)")
@click.pass_context
def repl(ctx: click.Context, room: str, lang: str, timeout: float | None) -> None:
    """A Python, JavaScript or TypeScript prompt in ROOM whose state persists from one input to
    the next (a code context, deleted when you leave)."""
    with _client(ctx) as client:
        ctx.exit(run_repl(client, lambda: _client(ctx), room, lang, timeout, _read))
