"""terminals: openTerminal, writeTerminal, resizeTerminal, closeTerminal, attachTerminal,
listTerminals.

Thin handlers over :mod:`sandboxd.terminals` (where the theory of operation is: a pty of the
room's devpts, the program a run of the room, the master read by the daemon while the attached
connection keeps up). Terminal ids are looked up among the caller's rooms only: another tenant's
id is TERMINAL_NOT_FOUND.
"""

from __future__ import annotations

from .. import protocol, sessions, terminals
from ..context import Context


async def open_terminal(ctx: Context,
                        p: protocol.OpenTerminalParams) -> protocol.OpenTerminalResult:
    if p.command is None:
        argv, command = None, "login shell"
    elif p.args is not None:
        argv, command = [p.command, *p.args], " ".join([p.command, *p.args])
    else:
        argv, command = ["/bin/sh", "-c", p.command], p.command
    env, cwd = p.env, p.cwd
    if p.session_id is not None:
        sessions.check_user(p.user)
        argv = await sessions.start_argv(
            ctx.rooms, ctx.uid, p.sandbox_id, p.session_id,
            None if p.command is None or p.args is None else [p.command, *p.args],
            p.command if p.command is not None and p.args is None else None, env=env, cwd=cwd)
        env, cwd = None, None
    term = await terminals.open_terminal(
        ctx.rooms, ctx.uid, p.sandbox_id, argv, command, check_limits=ctx.facts.check_run_limits,
        env=env, cwd=cwd, user=p.user, cols=p.cols, rows=p.rows, notify=ctx.notify,
        request_id=ctx.request_id, on_close=ctx.on_close)
    return protocol.OpenTerminalResult(terminal_id=term.id, pid=term.pid, tty=term.tty)


async def write_terminal(ctx: Context,
                         p: protocol.WriteTerminalParams) -> protocol.WriteTerminalResult:
    data = terminals.decode_input(p.data)
    term = terminals.lookup(ctx.rooms, ctx.uid, p.terminal_id)
    term.room.touch()
    return protocol.WriteTerminalResult(written=await term.write(data))


async def resize_terminal(ctx: Context,
                          p: protocol.ResizeTerminalParams) -> protocol.TerminalInfo:
    term = terminals.lookup(ctx.rooms, ctx.uid, p.terminal_id)
    term.resize(p.cols, p.rows)
    return term.info()


async def close_terminal(ctx: Context, p: protocol.TerminalParams) -> protocol.TerminalInfo:
    term = terminals.lookup(ctx.rooms, ctx.uid, p.terminal_id)
    return (await terminals.close(term)).info()


async def attach_terminal(ctx: Context, p: protocol.TerminalParams) -> protocol.TerminalInfo:
    term = terminals.lookup(ctx.rooms, ctx.uid, p.terminal_id)
    term.attach(terminals.Sink(ctx.notify, ctx.request_id, ctx.on_close, term._gone))
    await term.replay()
    return term.info()


async def list_terminals(ctx: Context,
                         p: protocol.ListTerminalsParams) -> protocol.ListTerminalsResult:
    room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id)
    return protocol.ListTerminalsResult(terminals=[t.info() for t in room.terminals.values()])
