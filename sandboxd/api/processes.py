"""processes: startProcess, getProcess, listProcesses, getProcessLogs, streamProcessLogs,
killProcess, killAllProcesses, waitForLog.

Thin handlers over :mod:`sandboxd.processes` (where the theory of operation is: a process is a
run the room owns, with its output in two rings addressed by absolute offsets). Rooms are per
caller uid, so another tenant naming the same sandbox id reaches its own room, which has none
of these processes (PROCESS_NOT_FOUND): nothing to see, read or kill.
"""

from __future__ import annotations

from .. import processes, protocol, sessions
from ..context import Context
from ..rooms import Room


async def _room(ctx: Context, sandbox_id: str) -> Room:
    return await ctx.rooms.get_or_create(ctx.uid, sandbox_id)


def _offsets(p: protocol.ProcessLogsParams) -> dict[str, int]:
    return {"stdout": p.stdout_offset or 0, "stderr": p.stderr_offset or 0}


async def start_process(ctx: Context, p: protocol.StartProcessParams) -> protocol.ProcessInfo:
    argv = [p.command, *p.args] if p.args is not None else ["/bin/sh", "-c", p.command]
    env, cwd = p.env, p.cwd
    if p.session_id is not None:
        sessions.check_user(p.user)
        argv = await sessions.start_argv(
            ctx.rooms, ctx.uid, p.sandbox_id, p.session_id,
            None if p.args is None else [p.command, *p.args],
            p.command if p.args is None else None, env=env, cwd=cwd)
        env, cwd = None, None
    rec = await processes.start(
        ctx.rooms, ctx.uid, p.sandbox_id, argv,
        p.command if p.args is None else " ".join([p.command, *p.args]),
        check_limits=ctx.facts.check_run_limits, env=env, cwd=cwd, user=p.user,
        limits=p.limits, process_id=p.process_id)
    return rec.info()


async def get_process(ctx: Context, p: protocol.ProcessParams) -> protocol.ProcessInfo:
    return processes.lookup(await _room(ctx, p.sandbox_id), p.process_id).info()


async def list_processes(ctx: Context,
                         p: protocol.ListProcessesParams) -> protocol.ListProcessesResult:
    room = await _room(ctx, p.sandbox_id)
    return protocol.ListProcessesResult(
        processes=[r.info() for r in processes.table(room).records.values()])


async def get_process_logs(ctx: Context, p: protocol.ProcessLogsParams) -> protocol.ProcessLogs:
    rec = processes.lookup(await _room(ctx, p.sandbox_id), p.process_id)
    return processes.read_logs(rec, _offsets(p))


async def stream_process_logs(ctx: Context,
                              p: protocol.ProcessLogsParams) -> protocol.ProcessInfo:
    rec = processes.lookup(await _room(ctx, p.sandbox_id), p.process_id)

    async def send(stream: str, data: str) -> None:
        await ctx.notify(protocol.ProcessOutput(
            request_id=ctx.request_id, process_id=rec.id,
            stream="stderr" if stream == "stderr" else "stdout", data=data))

    return (await processes.stream(rec, _offsets(p), send)).info()


async def kill_process(ctx: Context, p: protocol.KillProcessParams) -> protocol.ProcessInfo:
    sig = processes.signal_number(p.signal)
    room = await _room(ctx, p.sandbox_id)
    rec = processes.lookup(room, p.process_id)
    return (await processes.kill(room, rec, sig)).info()


async def kill_all_processes(
        ctx: Context, p: protocol.KillAllProcessesParams) -> protocol.KillAllProcessesResult:
    room = await _room(ctx, p.sandbox_id)
    return protocol.KillAllProcessesResult(killed=await processes.kill_all(room))


async def wait_for_log(ctx: Context, p: protocol.WaitForLogParams) -> protocol.WaitForLogResult:
    rec = processes.lookup(await _room(ctx, p.sandbox_id), p.process_id)
    line = await processes.wait_for_log(rec, p.pattern, regex=p.regex, timeout_ms=p.timeout)
    return protocol.WaitForLogResult(line=line)
