"""sandboxctl run, languages, examples: the code-run service from the command line.

Added to ``cli.main`` by cli.py; built on the client only.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from .cli_base import EXIT_CODES_HELP, _client, _print_json, _run


def _status_line(res: dict[str, Any]) -> str:
    comp = res.get("compile") or {}
    parts = [f"status {res.get('status')}", f"exit {res.get('exitCode')}"]
    if res.get("signal"):
        parts.append(f"signal {res['signal']}")
    if comp:
        parts.append(f"compile {comp.get('wallTimeMs')} ms")
    elif res.get("cached"):
        parts.append("compile cached")
    for key, unit in (("cpuTimeMs", "ms cpu"), ("wallTimeMs", "ms wall")):
        if res.get(key) is not None:
            parts.append(f"{res[key]} {unit}")
    if res.get("memoryPeakBytes"):
        parts.append(f"{res['memoryPeakBytes'] / 1048576:.1f} MiB peak")
    return "sandboxctl: " + ", ".join(parts)


@click.command(epilog=EXIT_CODES_HELP)
@click.option("--room", default="default", show_default=True, help="The room to run in.")
@click.option("--lang", "-l", "language", required=True, help="Language id or alias (py, c++, kt).")
@click.argument("source", required=False, default="-", metavar="[FILE|-]")
@click.option("--stdin", "stdin_file", type=click.File("r"), help="Feed FILE to the program.")
@click.option("--report", is_flag=True, help="Print the status line on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@click.argument("args", nargs=-1)
@click.pass_context
def run(ctx: click.Context, room: str, language: str, source: str, stdin_file: Any,
        report: bool, as_json: bool, args: tuple[str, ...]) -> None:
    """Compile (cached by source) and run SOURCE (a file, or - for standard input) in ROOM.

    Exits with the program's exit code; a compile error prints the compiler's output on stderr
    and exits 1.
    """
    code = sys.stdin.read() if source == "-" else open(source).read()  # noqa: SIM115
    stdin = stdin_file.read() if stdin_file is not None else None

    def body() -> int:
        with _client(ctx) as c:
            res = c.sandbox(room).run_code(language, code, stdin=stdin, args=list(args) or None)
        if as_json:
            _print_json(res)
        else:
            if res.get("status") == "CE":
                comp = res.get("compile") or {}
                sys.stderr.write(comp.get("stderr", "") + comp.get("stdout", ""))
            sys.stdout.write(res.get("stdout", ""))
            sys.stderr.write(res.get("stderr", ""))
        if report or res.get("status") == "CE":
            click.echo(_status_line(res.raw), err=True)
        return 1 if res.get("status") == "CE" else int(res.get("exitCode") or 0)

    _run(body)


@click.command(epilog=EXIT_CODES_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.pass_context
def languages(ctx: click.Context, as_json: bool) -> None:
    """The languages the daemon can run, their toolchain versions and aliases."""

    def body() -> int:
        with _client(ctx) as c:
            langs = c.list_languages()
        if as_json:
            _print_json(langs)
            return 0
        for lang in langs:
            mark = "✓" if lang.get("available") else "✗"
            click.echo(f"{mark} {lang['id']:<11} {lang.get('version') or '-'!s:<14} "
                       f"{'compiled' if lang.get('compiled') else 'interpreted':<12} "
                       f"{', '.join(lang.get('aliases') or [])}")
        return 0

    _run(body)


@click.command(epilog=EXIT_CODES_HELP)
@click.option("--room", default="examples", show_default=True, help="The room to run in.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_context
def examples(ctx: click.Context, room: str, as_json: bool) -> None:
    """Run a hello world in every language; a table of language, status and time."""

    def body() -> int:
        t0 = time.monotonic()
        with _client(ctx) as c:
            results = c.sandbox(room).run_example_code()
        if as_json:
            _print_json(results)
        else:
            click.echo(f"{'language':<11} {'status':<7} {'compile ms':>10} {'run ms':>7}  output")
            for r in results:
                if not r.get("available", True):
                    click.echo(f"{r['language']:<11} {'n/a':<7} {'':>10} {'':>7}  "
                               "(toolchain not in this rootfs)")
                    continue
                comp = (r.get("compile") or {}).get("wallTimeMs")
                click.echo(f"{r['language']:<11} {r.get('status')!s:<7} "
                           f"{'' if comp is None else comp:>10} "
                           f"{'' if r.get('wallTimeMs') is None else r['wallTimeMs']:>7}  "
                           f"{(r.get('stdout') or r.get('error') or '').strip()[:40]}")
            click.echo(f"total {time.monotonic() - t0:.1f} s")
        return 0 if all(r.get("success") or not r.get("available", True) for r in results) else 1

    _run(body)
