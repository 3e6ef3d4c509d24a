"""sandboxctl: a thin skin over :mod:`sandboxd.client` (and, for ``setup``/``doctor``, over
:mod:`sandboxd.hostsetup`, imported only by those commands so ``sandboxctl exec`` starts fast)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import click

from . import config, errors, protocol
from .cli_base import (  # noqa: F401 - re-exported: commands and tests use them as cli.*
    EXEC_EXIT_CODES_HELP,
    EXIT_CODES_HELP,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Progress,
    _client,
    _fail,
    _print_json,
    _run,
    _wire_json,
    safe,
)
from .client import ExecResult


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", metavar="PATH", envvar="SANDBOXD_SOCKET",
              help="Daemon socket (default: $SANDBOXD_SOCKET, else "
                   "$XDG_RUNTIME_DIR/sandboxd/sandboxd.sock, or /run/sandboxd/sandboxd.sock "
                   "for root).")
@click.option("--rpc-timeout", "timeout", type=click.FloatRange(min=0, min_open=True),
              metavar="SEC", help="Give up when the daemon stays silent this long, on top of "
                                  "an exec's own --timeout (default: wait).")
@click.version_option(package_name="sandboxd", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, socket_path: str | None, timeout: float | None) -> None:
    """Control sandboxd: run commands in rooms, list and destroy them, set up the host."""
    ctx.ensure_object(dict)
    ctx.obj["socket"] = socket_path
    ctx.obj["timeout"] = timeout


# --- ping / rooms / destroy --------------------------------------------------------------------


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("room", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's answer as JSON.")
@click.pass_context
def ping(ctx: click.Context, room: str | None, as_json: bool) -> None:
    """Check that the daemon answers (and that ROOM, if given, is alive)."""

    def body() -> None:
        with _client(ctx) as client:
            started = time.monotonic()
            result = client.ping(room)
            took = (time.monotonic() - started) * 1000
        if as_json:
            _print_json(result)
            return
        version = result.get("version", "?")
        click.echo(f"{result.get('message', 'pong')} from sandboxd {version} "
                   f"at {client.socket_path} ({took:.1f} ms)")
        caps = result.raw.get("capabilities")
        if isinstance(caps, dict):
            for key in sorted(caps):
                click.echo(f"  {key}: {json.dumps(caps[key], sort_keys=True, default=str)}")
        elif caps:
            click.echo(f"  capabilities: {json.dumps(caps, default=str)}")

    _run(body)


def _when(value: Any) -> str:
    """Timestamps as sent (ISO strings), or epoch seconds/milliseconds made readable."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1000 if value > 1e11 else value
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    return "-" if value in (None, "") else str(value)


@main.command(epilog=EXIT_CODES_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.pass_context
def rooms(ctx: click.Context, as_json: bool) -> None:
    """List your rooms."""

    def body() -> None:
        with _client(ctx) as client:
            infos = client.list_sandboxes()
        if as_json:
            _print_json([i.raw for i in infos])
            return
        rows = [("ROOM", "STATUS", "CREATED", "LAST ACTIVITY")]
        rows += [(safe(i.sandbox_id), safe(i.status), safe(_when(i.created_at)),
                  safe(_when(i.last_activity_at))) for i in infos]
        widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
        for r in rows:
            click.echo("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True))
                       .rstrip())

    _run(body)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.pass_context
def destroy(ctx: click.Context, room: str) -> None:
    """Destroy ROOM: kill its processes and discard its files."""

    def body() -> int:
        with _client(ctx) as client:
            result = client.sandbox(room).destroy()
        if result.get("destroyed", True):
            click.echo(f"destroyed {room}")
        else:
            click.echo(f"{room}: nothing to destroy")
        return EXIT_OK

    _run(body)


# --- exec / sh ---------------------------------------------------------------------------------


def _parse_env(values: Sequence[str]) -> dict[str, str] | None:
    env: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--env")
        env[key] = value
    return env or None


def _exit_status(result: ExecResult) -> int:
    """The exit code of exec/sh for a result: EXEC_EXIT_CODES_HELP, one line per verdict."""
    if result.status == "XX":
        return EXIT_ERROR  # the sandbox failed: the exit code the program never had means nothing
    if result.timed_out or result.status == "TO":
        return EXIT_TIMEOUT
    name = result.signal
    sig: int | None = name if isinstance(name, int) else None
    if isinstance(name, str):  # "SIGKILL" or "9"
        sig = int(name) if name.isdigit() else getattr(signal.Signals, name, None)
    if isinstance(sig, int) and sig > 0 and result.exit_code < 0:
        return 128 + int(sig)
    if not isinstance(result.exit_code, int) or result.exit_code < 0:
        return EXIT_ERROR
    return result.exit_code & 0xFF


def _stream(name: str, data: str) -> None:
    out = sys.stderr if name == "stderr" else sys.stdout
    out.write(data)
    out.flush()


def _size(text: str) -> int:
    """``1048576``, ``512K``, ``256M``, ``1G`` (binary units) -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 4096, 512K, 256M, 1G)") from None
    if value < 0:
        raise click.BadParameter(f"{text!r}: a size cannot be negative")
    return int(value)


def _limits(cpu_time: float | None, memory: str | None, pids: int | None,
            output_limit: str | None) -> dict[str, int] | None:
    """The exec ``limits`` object (wire names) from the command-line options."""
    out: dict[str, int] = {}
    if cpu_time is not None:
        out["cpuTimeMs"] = max(1, round(cpu_time * 1000))
    if memory is not None:
        out["memoryBytes"] = _size(memory)
    if pids is not None:
        out["pids"] = pids
    if output_limit is not None:
        out["outputBytes"] = _size(output_limit)
    return out or None


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / (1 << 20):.1f}MiB"


def _fig(value: Any) -> str:
    return "-" if value is None else str(value)


def _bytes(n: int) -> str:
    """64 MiB, 1 GiB, 512 KiB, 1000 bytes: the unit the value is a whole number of."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def killed_line(result: ExecResult, limits: dict[str, int] | None,
                timeout: float | None) -> str | None:
    """The one stderr line saying which limit or timeout ended the command (issue 22: an exec
    that hit --memory exited 137 and printed nothing: a limit looked like a crash); None when
    the command ended by itself. Sizes and times are the ones the command line asked for."""
    asked = limits or {}
    status, which = result.status, result.limit_exceeded
    if status == "XX":
        why = safe(result.get("error", "no reason given"))
        return f"sandboxctl: the sandbox failed, not the command: {why} (XX)"
    if status == "ML" or (status is None and result.oom_killed):
        size = asked.get("memoryBytes")
        return (f"sandboxctl: killed: memory limit{f' {_bytes(size)}' if size else ''} "
                f"exceeded (ML)")
    if status == "OL" or (status is None and which == "output"):
        size = asked.get("outputBytes")
        return (f"sandboxctl: killed: output limit{f' {_bytes(size)}' if size is not None else ''}"
                f" exceeded (OL)")
    if status == "TO" or result.timed_out:
        if which == "cpu":
            ms = asked.get("cpuTimeMs")
            return (f"sandboxctl: killed: CPU time limit{f' {ms / 1000:g} s' if ms else ''} "
                    f"exceeded (TO)")
        return (f"sandboxctl: killed: timed out after {timeout:g} s (TO)" if timeout
                else "sandboxctl: killed: wall-time limit exceeded (TO)")
    if which == "fileSize":
        return "sandboxctl: killed: file size limit exceeded (SG)"
    return None


def report_line(raw: dict[str, Any]) -> str:
    """``--report``: status, exit/signal, cpu, wall, peak memory (and the limit hit) on one line."""
    parts = [f"status={raw.get('status', '?')}"]
    parts.append(f"signal={raw['signal']}" if raw.get("signal")
                 else f"exit={raw.get('exitCode', '?')}")
    cpu, wall = raw.get("cpuTimeMs"), raw.get("wallTimeMs", raw.get("duration"))
    parts.append(f"cpu={'-' if cpu is None else f'{cpu}ms'}")
    parts.append(f"wall={'-' if wall is None else f'{wall}ms'}")
    parts.append(f"mem={_mib(raw.get('memoryPeakBytes'))}")
    if raw.get("pidsPeak") is not None:
        parts.append(f"pids={raw['pidsPeak']}")
    if raw.get("limitExceeded"):
        parts.append(f"limit={raw['limitExceeded']}")
    return "sandboxctl: " + " ".join(parts)


def _exec(ctx: click.Context, room: str, command: str, args: list[str] | None, cwd: str | None,
          env: Sequence[str], timeout: float | None, stdin: bool, user: str | None,
          as_json: bool, limits: dict[str, int] | None = None, report: bool = False) -> None:
    env_map = _parse_env(env)
    data: bytes | None = sys.stdin.buffer.read() if stdin else None

    def body() -> int:
        streamed = False

        def on_output(name: str, chunk: str) -> None:
            nonlocal streamed
            streamed = True
            _stream(name, chunk)

        with _client(ctx) as client:
            result = client.sandbox(room).exec(
                command, args, cwd=cwd, env=env_map, stdin=data, timeout=timeout,
                on_output=None if as_json else on_output, user=user, limits=limits)
        if as_json:
            _print_json(result.raw)
        elif not streamed:
            # A daemon that does not stream still returns the whole output at the end.
            _stream("stdout", result.stdout)
            _stream("stderr", result.stderr)
        if not as_json and (line := killed_line(result, limits, timeout)) is not None:
            click.echo(line, err=True)  # with or without --report, which adds its own line
        if report:
            click.echo(report_line(result.raw), err=True)
        return _exit_status(result)

    _run(body)


def _exec_options(fn: Callable[..., None]) -> Callable[..., None]:
    options: list[Callable[[Callable[..., None]], Callable[..., None]]] = [
        click.option("--cwd", metavar="DIR", help="Working directory (default: /workspace)."),
        click.option("--env", "-e", multiple=True, metavar="KEY=VALUE",
                     help="Set an environment variable (repeatable)."),
        click.option("--timeout", "-t", type=click.FloatRange(min=0, min_open=True),
                     metavar="SEC", help=f"Kill the command after SEC seconds "
                                         f"(exit {EXIT_TIMEOUT})."),
        click.option("--stdin", "-i", "stdin", is_flag=True,
                     help="Send this process's standard input to the command."),
        click.option("--user", "-u", type=click.Choice(["root", "sandbox"]),
                     help="Run as the room's root (default) or its unprivileged user."),
        click.option("--json", "as_json", is_flag=True,
                     help="Do not stream; print the whole result as JSON."),
        click.option("--cpu-time", type=click.FloatRange(min=0, min_open=True), metavar="SEC",
                     help="Kill the command when it has used SEC seconds of CPU (all its "
                          f"processes; exit {EXIT_TIMEOUT})."),
        click.option("--memory", metavar="SIZE",
                     help="Memory limit of the command (e.g. 256M; at most the room's)."),
        click.option("--pids", type=click.IntRange(min=1), metavar="N",
                     help="At most N processes and threads at once."),
        click.option("--output-limit", metavar="SIZE",
                     help="Keep at most SIZE of stdout and of stderr; kill the command past "
                          "it (default 16M)."),
        click.option("--report", is_flag=True,
                     help="Print a status line on stderr: status (OK RE SG TO ML OL XX), "
                          "exit/signal, cpu, wall, peak memory."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


class _ArgvCommand(click.Command):
    """``exec ROOM [OPTIONS] [--] CMD [ARG]...``: everything from CMD on belongs to the command.

    Click would otherwise take a command's own options (``grep -i``) for ours. When the user
    wrote no ``--``, one is inserted before the second positional argument (CMD)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" not in args:
            args = _separate(args, self.params)
        return super().parse_args(ctx, args)


def _separate(args: list[str], params: Sequence[click.Parameter]) -> list[str]:
    takes_value: set[str] = set()
    for p in params:
        if isinstance(p, click.Option) and not p.is_flag:
            takes_value.update(p.opts + p.secondary_opts)
    positionals = 0
    i = 0
    while i < len(args):
        token = args[i]
        if token.startswith("-") and token != "-":
            if token in takes_value:
                i += 1  # its value follows
        else:
            positionals += 1
            if positionals == 2:
                return [*args[:i], "--", *args[i:]]
        i += 1
    return args


@main.command("exec", cls=_ArgvCommand, epilog=EXEC_EXIT_CODES_HELP)
@click.argument("room")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARG]...")
@_exec_options
@click.option("--tty", "use_tty", is_flag=True,
              help="Run CMD on a terminal of the room (a pty), attached to this one: for "
                   "programs that want a tty (vi, top, a REPL). Takes --cwd and --env only.")
@click.pass_context
def exec_(ctx: click.Context, room: str, argv: tuple[str, ...], cwd: str | None,
          env: tuple[str, ...], timeout: float | None, stdin: bool, user: str | None,
          as_json: bool, cpu_time: float | None, memory: str | None, pids: int | None,
          output_limit: str | None, report: bool, use_tty: bool) -> None:
    """Run CMD with ARGs in ROOM (argv form, no shell), streaming its output; exit with its code.

    The room is created on first use. Options go before CMD: from CMD on, every argument is the
    command's own (the `--` is optional).

    \b
    Example: sandboxctl exec r1 -- python3 -c 'print(1)'
             sandboxctl exec --tty r1 -- python3     (an interactive REPL)
    """
    if use_tty:
        others = [name for name, given in (("--timeout", timeout is not None), ("--stdin", stdin),
                                            ("--user", user is not None), ("--json", as_json),
                                            ("--cpu-time", cpu_time is not None),
                                            ("--memory", memory is not None),
                                            ("--pids", pids is not None),
                                            ("--output-limit", output_limit is not None),
                                            ("--report", report)) if given]
        if others:
            raise click.UsageError(f"--tty takes --cwd and --env only, not {', '.join(others)}")
        if not os.isatty(sys.stdin.fileno()):
            raise click.UsageError("--tty needs a terminal on stdin (run it without --tty)")
        obj: dict[str, Any] = ctx.ensure_object(dict)
        path = obj.get("socket") or config.default_socket()
        ctx.exit(cli_shell.run_shell(path, room, list(argv), cwd=cwd, env=_parse_env(env)))
    _exec(ctx, room, argv[0], list(argv[1:]), cwd, env, timeout, stdin, user, as_json,
          _limits(cpu_time, memory, pids, output_limit), report)


@main.command(epilog=EXEC_EXIT_CODES_HELP)
@click.argument("room")
@click.argument("line")
@_exec_options
@click.pass_context
def sh(ctx: click.Context, room: str, line: str, cwd: str | None, env: tuple[str, ...],
       timeout: float | None, stdin: bool, user: str | None, as_json: bool,
       cpu_time: float | None, memory: str | None, pids: int | None, output_limit: str | None,
       report: bool) -> None:
    """Run the shell command LINE in ROOM, streaming its output; exit with its code.

    \b
    Example: sandboxctl sh r1 'ls -l | wc -l'
    """
    _exec(ctx, room, line, None, cwd, env, timeout, stdin, user, as_json,
          _limits(cpu_time, memory, pids, output_limit), report)


# --- background processes: start / ps / logs / kill ----------------------------------------------


@main.command(cls=_ArgvCommand, epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARG]...")
@click.option("--name", "process_id", metavar="ID",
              help="The process's id (1-63 of A-Z a-z 0-9 _ . -; default: generated).")
@click.option("--cwd", metavar="DIR", help="Working directory (default: /workspace).")
@click.option("--env", "-e", multiple=True, metavar="KEY=VALUE",
              help="Set an environment variable (repeatable).")
@click.option("--user", "-u", type=click.Choice(["root", "sandbox"]),
              help="Run as the room's root (default) or its unprivileged user.")
@click.option("--json", "as_json", is_flag=True, help="Print the process's record as JSON.")
@click.pass_context
def start(ctx: click.Context, room: str, argv: tuple[str, ...], process_id: str | None,
          cwd: str | None, env: tuple[str, ...], user: str | None, as_json: bool) -> None:
    """Start CMD in ROOM in the background and print its id; it keeps running after this
    command exits (see `ps`, `logs`, `kill`). A lone CMD with no ARG is a shell line.

    \b
    Example: sandboxctl start r1 --name web -- python3 -m http.server 8000
             sandboxctl start r1 'while sleep 1; do date; done'
    """
    command, args = (argv[0], None) if len(argv) == 1 else (argv[0], list(argv[1:]))

    def body() -> None:
        with _client(ctx) as client:
            proc = client.sandbox(room).start_process(
                command, args, process_id=process_id, cwd=cwd, env=_parse_env(env), user=user)
        if as_json:
            _print_json(proc.record.raw)
        elif proc.record.status == "running":
            click.echo(f"{proc.id} pid {proc.pid}")
        else:
            click.echo(f"{proc.id} {proc.record.status}: {proc.record.get('error', '')}",
                       err=True)
            raise SystemExit(EXIT_ERROR)

    _run(body)


def process_rows(records: Sequence[protocol.ProcessInfo]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("ID", "PID", "STATUS", "EXIT", "STARTED", "COMMAND")]
    for r in records:
        code = r.get("exitCode")
        rows.append((safe(r.process_id), str(r.pid), safe(r.status),
                     "-" if code is None else str(code), safe(_when(r.started_at)),
                     safe(r.command)))
    return rows


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@click.pass_context
def ps(ctx: click.Context, room: str, as_json: bool) -> None:
    """List ROOM's background processes, running and ended."""

    def body() -> None:
        with _client(ctx) as client:
            records = client.sandbox(room).list_processes()
        if as_json:
            _print_json([r.raw for r in records])
            return
        rows = process_rows(records)
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        for r in rows:
            click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())

    _run(body)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("process_id", metavar="ID")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing new output until the process ends.")
@click.option("--stdout-offset", type=click.IntRange(min=0), metavar="N",
              help="Start at byte N of stdout (resume where an earlier read stopped).")
@click.option("--stderr-offset", type=click.IntRange(min=0), metavar="N",
              help="Start at byte N of stderr.")
@click.pass_context
def logs(ctx: click.Context, room: str, process_id: str, follow: bool,
         stdout_offset: int | None, stderr_offset: int | None) -> None:
    """Print process ID's buffered output (stdout and stderr); with -f, follow it. On stderr
    a last line says where to resume (the offsets) and, once it ended, how it ended."""

    def body() -> int:
        with _client(ctx) as client:
            sb = client.sandbox(room)
            if follow:
                at = {"stdout": stdout_offset or 0, "stderr": stderr_offset or 0}

                def on_output(name: str, data: str) -> None:
                    # (exact for UTF-8 output the stream did not skip: what -f resumes from)
                    at[name] += len(data.encode("utf-8", "surrogatepass"))
                    _stream(name, data)

                try:
                    rec = sb.stream_process_logs(process_id, on_output,
                                                 stdout_offset=stdout_offset,
                                                 stderr_offset=stderr_offset)
                except (KeyboardInterrupt, errors.DaemonUnreachable):
                    click.echo(f"sandboxctl: resume with --stdout-offset {at['stdout']} "
                               f"--stderr-offset {at['stderr']}", err=True)
                    raise
                click.echo(f"sandboxctl: {process_id} {rec.status}"
                           + (f", exit {rec.get('exitCode')}" if "exitCode" in rec else ""),
                           err=True)
                return EXIT_OK
            got = sb.process_logs(process_id, stdout_offset=stdout_offset,
                                  stderr_offset=stderr_offset)
        _stream("stdout", got.stdout)
        _stream("stderr", got.stderr)
        note = " (older output was dropped)" if got.truncated else ""
        click.echo(f"sandboxctl: --stdout-offset {got.stdout_offset} --stderr-offset "
                   f"{got.stderr_offset}{note}", err=True)
        return EXIT_OK

    _run(body)


@main.command("kill", epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("process_id", metavar="ID")
@click.option("--signal", "-s", "sig", default=None, metavar="SIG",
              help="Signal name or number (default TERM); whatever is left 2 s later is killed.")
@click.pass_context
def kill_(ctx: click.Context, room: str, process_id: str, sig: str | None) -> None:
    """Kill process ID's whole tree in ROOM (everything it started, however detached)."""

    def body() -> None:
        signal_arg: int | str | None = int(sig) if sig is not None and sig.isdigit() else sig
        with _client(ctx) as client:
            rec = client.sandbox(room).kill_process(process_id, signal_arg)
        click.echo(f"{process_id} {rec.status}"
                   + (f" ({rec.get('signal')})" if rec.get("signal") else ""))

    _run(body)


# --- top ---------------------------------------------------------------------------------------


def top_rows(prev: dict[str, tuple[float, int]], sample: protocol.StatsResult,
             now: float) -> list[tuple[str, ...]]:
    """Table rows from a ``stats`` answer; CPU % from the previous sample of each room."""
    rows: list[tuple[str, ...]] = [("ROOM", "RUNS", "CPU%", "CPU TIME", "MEM", "MEM PEAK",
                                    "MEM LIMIT", "PIDS", "PIDS LIMIT", "OOM")]
    for room in sample.sandboxes:
        rid = room.sandbox_id
        use, lim = room.usage, room.limits  # usage figures may be absent: .get gives None
        cpu = use.get("cpuTimeMs")
        pct = "-"
        if cpu is not None and rid in prev and now > prev[rid][0]:
            pct = f"{100 * (cpu - prev[rid][1]) / ((now - prev[rid][0]) * 1000):.0f}"
        if cpu is not None:
            prev[rid] = (now, cpu)
        rows.append((rid, str(room.active_runs), pct,
                     "-" if cpu is None else f"{cpu / 1000:.1f}s",
                     _mib(use.get("memoryCurrentBytes")), _mib(use.get("memoryPeakBytes")),
                     _mib(lim.get("memoryBytes")),
                     _fig(use.get("pidsCurrent")), _fig(lim.get("pids")),
                     _fig(use.get("oomKills"))))
    return rows


@main.command(epilog=EXIT_CODES_HELP)
@click.option("--interval", "-d", type=click.FloatRange(min=0.1), default=2.0, metavar="SEC",
              show_default=True, help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one table (CPU% needs two samples: '-').")
@click.pass_context
def top(ctx: click.Context, interval: float, once: bool) -> None:
    """Show your live rooms with their usage (CPU, peak memory, processes), refreshed."""

    def body() -> None:
        prev: dict[str, tuple[float, int]] = {}
        with _client(ctx) as client:
            while True:
                sample = client.stats()
                rows = top_rows(prev, sample, time.monotonic())
                widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
                if not once:
                    click.clear()
                    click.echo(f"sandboxd rooms (cgroup backend {sample.backend}), "
                               f"every {interval:g} s; ^C to quit")
                for r in rows:
                    click.echo("  ".join(safe(v).ljust(w)
                                         for v, w in zip(r, widths, strict=True))
                               .rstrip())
                if once:
                    return
                time.sleep(interval)

    _run(body)


# --- files -------------------------------------------------------------------------------------

WRITE_CHUNK = 4 * 1024 * 1024


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("path")
@click.argument("src", required=False, default="-", metavar="[SRC|-]")
@click.pass_context
def write(ctx: click.Context, room: str, path: str, src: str) -> None:
    """Write host file SRC (or standard input) to PATH in ROOM, creating parent directories.

    Sent in 4 MiB pieces, so files of any size fit (the room's disk limit applies)."""

    def body() -> None:
        stream = sys.stdin.buffer if src == "-" else open(src, "rb")  # noqa: SIM115
        total = 0
        try:
            with _client(ctx) as client:
                sb = client.sandbox(room)
                first = True
                while True:
                    chunk = stream.read(WRITE_CHUNK)
                    if not chunk and not first:
                        break
                    r = sb.write_file(path, chunk, append=not first)
                    total += len(chunk)
                    first = False
                    if not chunk:
                        break
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()
        click.echo(f"wrote {total} bytes to {safe(r.get('path', path))}", err=True)

    _run(body)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("path")
@click.option("-o", "--output", metavar="FILE", help="Write to FILE instead of standard output.")
@click.pass_context
def read(ctx: click.Context, room: str, path: str, output: str | None) -> None:
    """Print PATH of ROOM (streamed: no size limit)."""

    def body() -> None:
        out = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115
        try:
            with _client(ctx) as client:
                client.sandbox(room).read_file(path, stream=out)
        finally:
            if output:
                out.close()
            else:
                out.flush()

    _run(body)


@main.command("ls", epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("path", required=False, default="/workspace")
@click.option("-R", "recursive", is_flag=True, help="List subdirectories too.")
@click.option("-a", "hidden", is_flag=True, help="Include names starting with a dot.")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@click.pass_context
def ls(ctx: click.Context, room: str, path: str, recursive: bool, hidden: bool,
       as_json: bool) -> None:
    """List PATH (default /workspace) in ROOM."""

    def body() -> None:
        with _client(ctx) as client:
            files = client.sandbox(room).list_files(path, recursive=recursive,
                                                    include_hidden=hidden)
        if as_json:
            _print_json([f.raw for f in files])
            return
        kinds = {"file": "-", "directory": "d", "symlink": "l"}
        for f in files:
            click.echo(f"{kinds.get(f.type, '?')}{safe(f.mode)} {f.size:>12} "
                       f"{safe(f.modified_at)} "
                       f"{safe(f.relative_path)}{'/' if f.type == 'directory' else ''}")

    _run(body)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.pass_context
def rm(ctx: click.Context, room: str, paths: tuple[str, ...]) -> None:
    """Delete files (not directories) in ROOM."""

    def body() -> None:
        with _client(ctx) as client:
            for path in paths:
                client.sandbox(room).delete_file(path)

    _run(body)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("src")
@click.argument("dst")
@click.pass_context
def mv(ctx: click.Context, room: str, src: str, dst: str) -> None:
    """Move SRC to DST in ROOM (into DST if it is a directory)."""

    def body() -> None:
        with _client(ctx) as client:
            r = client.sandbox(room).move_file(src, dst)
        click.echo(f"{safe(r.get('path', src))} -> {safe(r.get('newPath', dst))}", err=True)

    _run(body)


@main.command("mkdir", epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("path")
@click.option("-p", "parents", is_flag=True, help="Make parents as needed; no error if it exists.")
@click.pass_context
def mkdir_(ctx: click.Context, room: str, path: str, parents: bool) -> None:
    """Make directory PATH in ROOM."""

    def body() -> None:
        with _client(ctx) as client:
            client.sandbox(room).mkdir(path, recursive=parents)

    _run(body)


def _room_path(arg: str) -> tuple[str, str] | None:
    """``ROOM:PATH`` -> (room, path); a host path (no colon before any slash) -> None."""
    head, sep, tail = arg.partition(":")
    if sep and head and "/" not in head and not arg.startswith(("/", ".")):
        return head, tail or "/workspace"
    return None


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("src")
@click.argument("dest")
@click.pass_context
def cp(ctx: click.Context, src: str, dest: str) -> None:
    """Copy a file or directory between the host and a room, as a streamed tar archive.

    \b
    Into a room:  sandboxctl cp ./project r1:/workspace     (-> /workspace/project)
    Out of one:   sandboxctl cp r1:/workspace/out ./results  (-> ./results/out)

    The destination is a directory the source is placed in (created if missing). Archives from
    a room are extracted defensively: no absolute names, no "..", never through a symlink, no
    devices, no setuid bits. On a terminal, stderr shows the archive bytes moved and the rate
    as they go."""
    s, d = _room_path(src), _room_path(dest)
    if (s is None) == (d is None):
        raise click.UsageError("exactly one of SRC and DEST must be ROOM:PATH")

    def body() -> None:
        progress = Progress("cp")  # bytes and rate on stderr when it is a terminal
        with _client(ctx) as client:
            if d is not None:
                up = client.sandbox(d[0]).copy_to(src, d[1], progress=progress)
                progress.finish()
                click.echo(f"copied {up.bytes} bytes of archive into {d[0]}:{d[1]}", err=True)
            elif s is not None:
                down = client.sandbox(s[0]).copy_from(s[1], dest, progress=progress)
                progress.finish()
                click.echo(f"copied {down.files} files, {down.directories} directories, "
                           f"{down.symlinks} symlinks ({down.bytes} bytes) to {dest}"
                           + (f"; skipped {down.skipped} unsafe entries" if down.skipped
                              else ""), err=True)

    _run(body)


@main.command("git", epilog=EXIT_CODES_HELP)
@click.argument("room")
@click.argument("url")
@click.option("--branch", "-b", metavar="NAME", help="Branch (or tag) to check out.")
@click.option("--target", metavar="DIR", help="Clone into DIR (default /workspace/<repo>).")
@click.option("--depth", type=click.IntRange(min=1), help="Shallow clone of this many commits.")
@click.pass_context
def git_(ctx: click.Context, room: str, url: str, branch: str | None, target: str | None,
         depth: int | None) -> None:
    """Clone URL into ROOM (git runs inside the room, under its limits)."""

    def body() -> None:
        with _client(ctx) as client:
            r = client.sandbox(room).git_checkout(url, branch=branch, target_dir=target,
                                                  depth=depth)
        click.echo(f"cloned {r.get('repoUrl')} ({r.get('branch') or 'no branch'}) into "
                   f"{r.get('targetDir')}")

    _run(body)


# --- host set-up -------------------------------------------------------------------------------


@main.command(epilog=EXIT_CODES_HELP)
@click.option("--user", "user", required=True, metavar="USER",
              help="The user that will run sandboxd.")
@click.option("--state-dir", metavar="DIR",
              help="State directory to create for USER (default: ~USER/.local/state/sandboxd).")
def setup(user: str, state_dir: str | None) -> None:
    """Prepare this host so USER can run sandboxd rootless (run once, as root; idempotent).

    Gives USER subordinate uid/gid ranges, delegates cgroups (v2 or v1) to USER, creates the
    state directory and the socket's runtime directory.
    """
    from . import hostsetup

    def body() -> None:
        for line in hostsetup.setup(user, state_dir):
            click.echo(line)

    _run(body)


@main.command(epilog="Exits 0 when the essential checks pass, 1 otherwise.")
@click.option("--user", "user", metavar="USER",
              help="Diagnose USER (default: the user the daemon at the socket runs as, else "
                   "you); as root, the probes run as USER.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.pass_context
def doctor(ctx: click.Context, user: str | None, as_json: bool) -> None:
    """Check what this host offers the daemon's user, and what each missing piece costs.

    The first line names the user and the daemon the report is about. Host-wide checks, root's
    to fix (and probes only root can run as another user), are listed apart, last."""
    from . import hostsetup

    def body() -> int:
        subject = hostsetup.find_subject(user, ctx.ensure_object(dict).get("socket"))
        checks = hostsetup.doctor(user=user, socket=subject.socket, subject=subject)
        essential_ok = all(c.ok for c in checks if c.essential)
        if as_json:
            _print_json([c.as_dict() for c in checks])
            return EXIT_OK if essential_ok else EXIT_ERROR
        click.echo(safe(subject.headline()))
        sections = [("", [c for c in checks if c.scope != "host"]),
                    ("host-wide, root's to fix (sandboxctl setup, sysctls):",
                     [c for c in checks if c.scope == "host"])]
        for title, part in sections:
            if title and part:
                click.echo(title)
            for c in part:
                mark = "-" if c.skipped else "✓" if c.ok else ("✗" if c.essential else "!")
                click.echo(f"{'  ' if title else ''}{mark} {c.name}: {c.detail}")
                if not c.ok and c.cost:
                    click.echo(f"{'  ' if title else ''}    cost: {c.cost}")
        click.echo(f"essential checks pass for {subject.user}" if essential_ok
                   else f"essential checks FAIL: sandboxd cannot run rooms here as "
                        f"{subject.user}")
        return EXIT_OK if essential_ok else EXIT_ERROR

    _run(body)


from . import cli_code  # noqa: E402 - run, languages, examples

for _command in (cli_code.run, cli_code.languages, cli_code.examples):
    main.add_command(_command)

from . import cli_ports  # noqa: E402 - port, unport

for _command in (cli_ports.port, cli_ports.unport):
    main.add_command(_command)

from . import cli_backups  # noqa: E402 - backup, restore, backups, unbackup, fork, export, import

for _command in cli_backups.COMMANDS:
    main.add_command(_command)

if __name__ == "__main__":  # pragma: no cover
    main()

from . import cli_shell  # noqa: E402 - shell

main.add_command(cli_shell.shell)

from . import cli_repl  # noqa: E402 - repl

main.add_command(cli_repl.repl)

from . import cli_mcp  # noqa: E402 - mcp (its server is imported only when it runs)

main.add_command(cli_mcp.mcp)
