"""exec: run a command (argv or shell form) in a room, with optional streaming and limits."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from .. import protocol, runs, sessions
from ..context import Context


def output_sender(ctx: Context) -> runs.OutputCallback:
    """A run's output as ``exec.output`` notifications of the current call."""
    async def on_output(stream: str, data: str) -> None:
        await ctx.notify(protocol.ExecOutput(request_id=ctx.request_id,
                                             stream="stderr" if stream == "stderr" else "stdout",
                                             data=data))
    return on_output


def report(res: runs.RunResult) -> protocol.RunReport:
    """The limits report of a run (the fields ``exec`` and ``runCode`` share)."""
    return protocol.RunReport(
        status=res.status, exit_code=res.exit_code, signal=res.signal, timed_out=res.timed_out,
        limit_exceeded=res.limit_exceeded, oom_killed=res.oom_killed,
        output_truncated=res.output_truncated, cpu_time_ms=res.cpu_time_ms,
        wall_time_ms=res.wall_time_ms, memory_peak_bytes=res.memory_peak_bytes,
        pids_peak=res.pids_peak, error=res.error or protocol.UNSET)


async def exec_(ctx: Context, p: protocol.ExecParams) -> protocol.ExecResult:
    started = time.time()
    argv = [p.command, *p.args] if p.args is not None else ["/bin/sh", "-c", p.command]
    on_output = output_sender(ctx) if p.stream else None
    ended: bool | protocol.Unset = protocol.UNSET
    if p.session_id is not None:
        sessions.check_user(p.user)
        res, ended = await sessions.run_line(
            ctx.rooms, ctx.uid, p.sandbox_id, p.session_id,
            None if p.args is None else [p.command, *p.args], p.command,
            check_limits=ctx.facts.check_run_limits, env=p.env, cwd=p.cwd,
            stdin=(p.stdin or "").encode(), limits=p.limits, timeout_ms=p.timeout,
            on_output=on_output)
    else:
        res = await runs.run_in_room(
            ctx.rooms, ctx.uid, p.sandbox_id, argv, check_limits=ctx.facts.check_run_limits,
            env=p.env, cwd=p.cwd, stdin=(p.stdin or "").encode(), user=p.user, limits=p.limits,
            timeout_ms=p.timeout, on_output=on_output)
    rep = report(res)
    return protocol.ExecResult(
        success=res.status == "OK", stdout=res.stdout, stderr=res.stderr,
        command=p.command if p.args is None else " ".join([p.command, *p.args]),
        duration=res.wall_time_ms,
        timestamp=datetime.fromtimestamp(started, UTC).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"), session_ended=ended,
        **{f: getattr(rep, f) for f in protocol.RunReport.__struct_fields__})
