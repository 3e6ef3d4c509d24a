"""ping, getSandbox, listSandboxes, destroy."""

from __future__ import annotations

import os

import msgspec

from .. import __version__, errors, protocol
from ..context import Context
from ..jail import JailError
from ..rooms import iso


async def ping(ctx: Context, p: protocol.PingParams) -> protocol.PingResult:
    caps = ctx.facts.capabilities()
    if ctx.uid not in (0, os.getuid()):
        # Free slices are a daemon-wide figure: to other tenants, an activity side channel (M4).
        caps = msgspec.structs.replace(caps, id_slices={
            k: v for k, v in caps.id_slices.items() if k != "slicesFree"})
    sandbox: protocol.PingSandbox | protocol.Unset = protocol.UNSET
    if p.sandbox_id is not None:
        room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id)
        try:
            reply = await room.handle.ping()
        except (JailError, TimeoutError) as err:
            raise errors.room_failure(err, room.id, "ping") from err
        sandbox = protocol.PingSandbox(sandbox_id=room.id, init=True, runs=reply.runs)
    return protocol.PingResult(message="pong", version=__version__, capabilities=caps,
                               sandbox=sandbox)


async def get_sandbox(ctx: Context, p: protocol.GetSandboxParams) -> protocol.SandboxInfo:
    # Explicit: this is how a caller acknowledges that a room of theirs died and gets a new one.
    room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id, p.options, explicit=True)
    return protocol.SandboxInfo(sandbox_id=room.id, status=room.status,
                                created_at=iso(room.created_at), options=room.options_wire(),
                                incarnation=room.incarnation)


async def list_sandboxes(ctx: Context,
                         p: protocol.ListSandboxesParams) -> protocol.ListSandboxesResult:
    rooms = ctx.rooms
    admin = rooms.is_admin(ctx.uid)
    out = [protocol.SandboxInfo(
        sandbox_id=r.id, status=r.status, created_at=iso(r.created_at),
        last_activity_at=iso(r.last_activity_wall), incarnation=r.incarnation,
        owner=r.owner if admin else None)
        for r in rooms.visible_rooms(ctx.uid) if r.status == "ready"]
    # The caller's rooms that died and were not yet destroyed or re-made: listed, so that a
    # listing tells what the next call on them will answer.
    out += [protocol.SandboxInfo(sandbox_id=rid, status="dead", reason=t.reason,
                                 incarnation=t.incarnation, died_at=iso(t.died_at))
            for (owner, rid), t in rooms.dead.items() if owner == ctx.uid]
    # Rooms put to sleep (onIdle "snapshot"): the next call on one wakes it.
    if rooms.sleeper is not None:
        live = {r.sandbox_id for r in out}
        out += [protocol.SandboxInfo(sandbox_id=s.sandbox_id, status="stopped",
                                     created_at=iso(s.created_at),
                                     last_activity_at=iso(s.stopped_at),
                                     incarnation=s.incarnation)
                for s in rooms.sleeper.list(ctx.uid) if s.sandbox_id not in live]
    return protocol.ListSandboxesResult(sandboxes=out)


async def destroy(ctx: Context, p: protocol.DestroyParams) -> protocol.DestroyResult:
    destroyed = await ctx.rooms.destroy(ctx.uid, p.sandbox_id)
    return protocol.DestroyResult(sandbox_id=p.sandbox_id, destroyed=destroyed)
