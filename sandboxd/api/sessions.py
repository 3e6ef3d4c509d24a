"""Sessions: persistent shells (createSession, deleteSession, listSessions); ``exec``,
``startProcess`` and ``openTerminal`` take a sessionId (``sandboxd.sessions``)."""

from __future__ import annotations

from .. import protocol, sessions
from ..context import Context


async def create_session(ctx: Context, p: protocol.CreateSessionParams) -> protocol.SessionInfo:
    sess = await sessions.create(ctx.rooms, ctx.uid, p.sandbox_id, p.session_id, cwd=p.cwd,
                                 env=p.env, check_limits=ctx.facts.check_run_limits)
    return sess.info()


async def delete_session(ctx: Context, p: protocol.SessionParams) -> protocol.SessionInfo:
    room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id)
    return (await sessions.delete(room, p.session_id)).info()


async def list_sessions(ctx: Context,
                        p: protocol.ListSessionsParams) -> protocol.ListSessionsResult:
    room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id)
    return protocol.ListSessionsResult(sessions=[s.info() for s in room.sessions.values()])
