"""sandboxctl backup, restore, backups, unbackup, fork, export, import: persistence from the
command line (docs/persistence.md).

Added to ``cli.main`` by cli.py; built on the client only.
"""

from __future__ import annotations

import sys

import click

from .cli_base import EXIT_CODES_HELP, _client, _print_json, _run, safe


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.option("--dir", "directory", metavar="DIR", help="What to back up (default /workspace).")
@click.option("--name", help="A name for it.")
@click.option("--exclude", "excludes", multiple=True, metavar="GLOB",
              help="Leave out what matches (tar globs, e.g. node_modules, '*.log'); repeatable.")
@click.option("--ttl", "ttl", type=click.IntRange(min=1), metavar="SEC",
              help="Delete it after SEC seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's answer as JSON.")
@click.pass_context
def backup(ctx: click.Context, room: str, directory: str | None, name: str | None,
           excludes: tuple[str, ...], ttl: int | None, as_json: bool) -> None:
    """Back up a directory of ROOM (the room keeps running) and print the backup's id."""

    def body() -> None:
        with _client(ctx) as client:
            got = client.sandbox(room).create_backup(directory, name=name,
                                                     excludes=list(excludes) or None,
                                                     ttl_seconds=ttl)
        if as_json:
            _print_json(got)
        else:
            click.echo(safe(got.backup_id))

    _run(body)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("backup_id")
@click.option("--dir", "directory", metavar="DIR",
              help="Where to restore it (default: the directory it was made of).")
@click.pass_context
def restore(ctx: click.Context, room: str, backup_id: str, directory: str | None) -> None:
    """Replace a directory of ROOM (made on demand) with BACKUP_ID's contents."""

    def body() -> None:
        with _client(ctx) as client:
            got = client.sandbox(room).restore_backup(backup_id, directory)
        click.echo(f"restored {safe(got.backup_id)} into {safe(room)}:{safe(got.dir)}")

    _run(body)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("room", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's answer as JSON.")
@click.pass_context
def backups(ctx: click.Context, room: str | None, as_json: bool) -> None:
    """List your backups (of ROOM only, if given)."""

    def body() -> None:
        with _client(ctx) as client:
            got = client.list_backups(room)
        if as_json:
            _print_json(got)
            return
        for b in got:
            click.echo("\t".join(safe(x) for x in (
                b.backup_id, b.sandbox_id, b.dir, b.size_bytes, b.created_at, b.name)))

    _run(body)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("backup_id")
@click.pass_context
def unbackup(ctx: click.Context, backup_id: str) -> None:
    """Delete BACKUP_ID (no error if there is none)."""

    def body() -> None:
        with _client(ctx) as client:
            got = client.delete_backup(backup_id)
        click.echo(("deleted " if got.deleted else "no backup ") + safe(backup_id))

    _run(body)


@click.command(epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("new_room")
@click.pass_context
def fork(ctx: click.Context, room: str, new_room: str) -> None:
    """Make NEW_ROOM: ROOM's options and a copy of its writable layer (ROOM keeps running)."""

    def body() -> None:
        with _client(ctx) as client:
            client.sandbox(room).fork(new_room)
        click.echo(safe(new_room))

    _run(body)


@click.command("export", epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.option("--dir", "directory", metavar="DIR", help="What to export (default /workspace).")
@click.option("--exclude", "excludes", multiple=True, metavar="GLOB", help="As for backup.")
@click.pass_context
def export_(ctx: click.Context, room: str, directory: str | None,
            excludes: tuple[str, ...]) -> None:
    """Write a directory of ROOM to stdout as a gzip'd tar: sandboxctl export ROOM > ws.tgz"""
    if sys.stdout.isatty():
        raise click.UsageError("stdout is a terminal: redirect it to a file")

    def body() -> None:
        out = sys.stdout.buffer
        with _client(ctx) as client:
            got = client.sandbox(room).export(out, directory, excludes=list(excludes) or None)
        out.flush()
        click.echo(f"exported {got.size_bytes} bytes, sha256 {got.sha256}", err=True)

    _run(body)


@click.command("import", epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.option("--dir", "directory", metavar="DIR", help="Where to unpack it (default /workspace).")
@click.pass_context
def import_(ctx: click.Context, room: str, directory: str | None) -> None:
    """Replace a directory of ROOM with a gzip'd tar read from stdin (all or nothing):
    sandboxctl import ROOM < ws.tgz"""
    if sys.stdin.isatty():
        raise click.UsageError("stdin is a terminal: redirect a .tgz file into it")

    def body() -> None:
        with _client(ctx) as client:
            got = client.sandbox(room).import_archive(sys.stdin.buffer, directory)
        click.echo(f"imported {got.size_bytes} bytes into {safe(room)}:{safe(got.dir)}")

    _run(body)


COMMANDS = (backup, restore, backups, unbackup, fork, export_, import_)
