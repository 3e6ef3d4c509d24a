"""sandboxctl shell: an interactive terminal in a room from a real terminal (issue 15).

Added to ``cli.main`` by cli.py. Speaks openTerminal / writeTerminal / resizeTerminal on its own
connection (the output notifications come after openTerminal's answer). The user's terminal is
put in raw mode (so ^C, ^D and every key reach the program, whose own pty does the line
editing) and restored on every way out; the window size is sent at start and on SIGWINCH; the
exit code is the program's.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import termios
import tty
from typing import Any

import click

from . import config
from .cli_base import EXIT_CODES_HELP


def _size() -> tuple[int, int]:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(
            sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 80, 24
    return cols or 80, rows or 24


def run_shell(socket_path: str, room: str, argv: list[str], *, cwd: str | None = None,
              env: dict[str, str] | None = None) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    ids = iter(range(1, 1 << 30))
    buf = b""

    def send(method: str, **params: Any) -> int:
        rid = next(ids)
        sock.sendall(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method,
                                 "params": params}).encode() + b"\n")
        return rid

    cols, rows = _size()
    params: dict[str, Any] = {"sandboxId": room, "cols": cols, "rows": rows}
    if argv:
        params.update(command=argv[0], args=argv[1:])
    if cwd is not None:
        params["cwd"] = cwd
    if env:
        params["env"] = env
    open_id = send("openTerminal", **params)
    tid: str | None = None
    winch_r, winch_w = os.pipe()
    os.set_blocking(winch_w, False)
    old_winch = signal.signal(signal.SIGWINCH, lambda *_: os.write(winch_w, b"w"))
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin)
    try:
        tty.setraw(stdin)
        while True:
            ready, _, _ = select.select([sock, stdin, winch_r] if tid else [sock], [], [])
            if winch_r in ready:
                os.read(winch_r, 64)
                c, r = _size()
                send("resizeTerminal", terminalId=tid, cols=c, rows=r)
            if stdin in ready:
                data = os.read(stdin, 65536)
                if data:
                    send("writeTerminal", terminalId=tid, data=base64.b64encode(data).decode())
            if sock in ready:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise click.ClickException("the daemon closed the connection")
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if msg.get("id") == open_id:
                        if "error" in msg:
                            raise click.ClickException(str(msg["error"].get("message")))
                        tid = msg["result"]["terminalId"]
                    elif msg.get("method") == "terminal.output":
                        os.write(sys.stdout.fileno(), base64.b64decode(msg["params"]["data"]))
                    elif msg.get("method") == "terminal.exit":
                        return int(msg["params"]["exitCode"])
    finally:
        termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old_winch)
        os.close(winch_r)
        os.close(winch_w)
        with contextlib.suppress(OSError):
            sock.close()


@click.command(epilog=EXIT_CODES_HELP, context_settings={"ignore_unknown_options": True})
@click.argument("room")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def shell(ctx: click.Context, room: str, argv: tuple[str, ...]) -> None:
    """An interactive terminal in ROOM (its login shell, or ARGV after --); exits with the
    program's code. With stdin not a terminal, runs ARGV (or sh) without a pty."""
    obj: dict[str, Any] = ctx.ensure_object(dict)
    path = obj.get("socket") or config.default_socket()
    if not os.isatty(sys.stdin.fileno()):
        click.echo("sandboxctl shell: stdin is not a terminal; running without a pty",
                   err=True)
        from .cli_base import _client

        with _client(ctx) as client:
            res = client.sandbox(room).exec(" ".join(argv) if argv else sys.stdin.read())
        sys.stdout.write(res.stdout)
        sys.stderr.write(res.stderr)
        ctx.exit(res.exit_code)
    ctx.exit(run_shell(path, room, list(argv)))
