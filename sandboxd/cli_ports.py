"""sandboxctl port, unport: exposed ports from the command line (docs/ports.md).

Added to ``cli.main`` by cli.py; built on the client only.
"""

from __future__ import annotations

import click

from .cli_base import EXIT_CODES_HELP, _client, _print_json, _run, safe


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("port", type=click.IntRange(1, 65535), required=False)
@click.option("--name", help="A name for the exposure (default: the port number).")
@click.option("--unix", "unix_socket", is_flag=True,
              help="Expose it as a Unix socket served to your uid only; prints its path.")
@click.option("--wait", "wait", type=click.FloatRange(min=0, min_open=True), metavar="SEC",
              help="First wait up to SEC seconds for the port to accept connections.")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's answer as JSON.")
@click.pass_context
def port(ctx: click.Context, room: str, port: int | None, name: str | None, unix_socket: bool,
         wait: float | None, as_json: bool) -> None:
    """Expose PORT of ROOM on a host loopback port and print its URL (or, with --unix, a Unix
    socket's path). Without PORT: list ROOM's exposed ports."""

    def body() -> None:
        with _client(ctx) as client:
            sb = client.sandbox(room)
            if port is None:
                exposed = sb.get_exposed_ports()
                if as_json:
                    _print_json(exposed)
                    return
                for e in exposed:
                    click.echo(f"{e.port}\t{safe(e.name)}\t{safe(e.get('url') or e.get('path'))}")
                return
            if wait is not None:
                sb.wait_for_port(port, timeout=wait)
            got = sb.expose_port(port, name=name, unix_socket=unix_socket)
        if as_json:
            _print_json(got)
        else:
            click.echo(safe(got.get("url") or got.get("path")))

    _run(body)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("port", type=click.IntRange(1, 65535))
@click.pass_context
def unport(ctx: click.Context, room: str, port: int) -> None:
    """Stop exposing PORT of ROOM (no error if it was not exposed)."""

    def body() -> None:
        with _client(ctx) as client:
            got = client.sandbox(room).unexpose_port(port)
        if not got.unexposed:
            click.echo(f"{room}: port {port} was not exposed", err=True)

    _run(body)
