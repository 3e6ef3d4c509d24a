"""sandboxctl mcp: sandboxd as an MCP server for AI agents (docs/mcp.md).

Added to ``cli.main`` by cli.py. The server (:mod:`sandboxd.mcp_server`) needs the optional
extra ``sandboxd[mcp]``; it is imported only when the command runs, so the core CLI works
without it and this command says what to install.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from typing import Any

import click

from .cli_base import EXIT_CODES_HELP, EXIT_ERROR, EXIT_USAGE, _run

INSTALL_HINT = "pip install 'sandboxd[mcp]'"
#: the modules of the extra (and what they pull in): a missing one means the extra is missing
_EXTRA_MODULES = {"mcp", "mcp_types", "jsonschema", "uvicorn", "httpx2", "pydantic", "starlette",
                  "anyio"}


def _parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8765)",
                                 param_hint="--http")
    return host, int(port)


def _token(token_file: str | None) -> str | None:
    if token_file is not None:
        with open(token_file) as f:
            token = f.read().strip()
        if not token:
            raise click.BadParameter(f"{token_file} is empty", param_hint="--token-file")
        return token
    return os.environ.get("SANDBOXD_MCP_TOKEN") or None


@click.command(epilog=EXIT_CODES_HELP)
@click.option("--socket", "socket_path", metavar="PATH",
              help="Daemon socket (default: sandboxctl's --socket, $SANDBOXD_SOCKET, ...).")
@click.option("--http", "http", metavar="HOST:PORT",
              help="Serve Streamable HTTP at http://HOST:PORT/mcp instead of stdio (port 0: "
                   "any free one; the URL is printed on stderr).")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False), metavar="PATH",
              help="--http: the bearer token clients must send, read from PATH (else "
                   "$SANDBOXD_MCP_TOKEN, else a new one printed on stderr; required for a "
                   "non-loopback HOST).")
@click.option("--clip", "clip_bytes", type=click.IntRange(min=256), default=16384,
              show_default=True, metavar="BYTES",
              help="Clip each output stream a tool returns to BYTES (the rest stays readable: "
                   "a file in the room, or an offset).")
@click.pass_context
def mcp(ctx: click.Context, socket_path: str | None, http: str | None, token_file: str | None,
        clip_bytes: int) -> None:
    """Serve MCP (Model Context Protocol) tools over the daemon: run_code, exec, files, rooms,
    processes, ports, backups. Stdio by default, which is what agent configs launch."""
    try:
        from . import mcp_server
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in _EXTRA_MODULES:
            raise
        click.echo(f"sandboxctl mcp: the MCP SDK is not installed ({err.name}): {INSTALL_HINT}",
                   err=True)
        sys.exit(EXIT_ERROR)
    obj: dict[str, Any] = ctx.ensure_object(dict)
    sock = socket_path or obj.get("socket")
    if http is None:
        _run(lambda: asyncio.run(mcp_server.serve_stdio(sock, clip_bytes)))
    host, port = _parse_hostport(http)
    token = _token(token_file)
    if token is None:
        if not mcp_server.is_loopback(host):
            click.echo(f"sandboxctl mcp: refusing to serve {host} (not a loopback address) "
                       "without a token: give --token-file or $SANDBOXD_MCP_TOKEN", err=True)
            sys.exit(EXIT_USAGE)
        token = secrets.token_urlsafe(32)
        click.echo(f"sandboxctl mcp: bearer token: {token}", err=True)
    _run(lambda: asyncio.run(mcp_server.serve_http(sock, clip_bytes, host, port, token)))
