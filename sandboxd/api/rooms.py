"""ping, getSandbox, listSandboxes, destroy."""

from __future__ import annotations

import os
from typing import Any

from .. import __version__, protocol
from ..errors import InternalError
from ..jail import JailError
from ..rooms import iso
from . import Context, method


@method("ping", protocol.PingParams)
async def ping(ctx: Context, p: protocol.PingParams) -> dict[str, Any]:
    caps = ctx.daemon.capabilities()
    if ctx.uid not in (0, os.getuid()):
        # Free slices are a daemon-wide figure: to other tenants, an activity side channel (M4).
        caps["idSlices"] = {k: v for k, v in (caps.get("idSlices") or {}).items()
                            if k != "slicesFree"}
    out: dict[str, Any] = {"message": "pong", "version": __version__, "capabilities": caps}
    if p.sandbox_id is not None:
        room = await ctx.daemon.rooms.get_or_create(ctx.uid, p.sandbox_id)
        try:
            reply = await room.handle.ping()
        except (JailError, TimeoutError) as err:
            raise InternalError(f"sandbox {room.id} init did not answer: {err}",
                                sandboxId=room.id) from err
        out["sandbox"] = {"sandboxId": room.id, "init": reply.get("op") == "pong",
                          "runs": reply.get("runs", 0)}
    return out


@method("getSandbox", protocol.GetSandboxParams)
async def get_sandbox(ctx: Context, p: protocol.GetSandboxParams) -> dict[str, Any]:
    # Explicit: this is how a caller acknowledges that a room of theirs died and gets a new one.
    room = await ctx.daemon.rooms.get_or_create(ctx.uid, p.sandbox_id, p.options, explicit=True)
    return {"sandboxId": room.id, "status": room.status, "createdAt": iso(room.created_at),
            "options": room.options_wire(), "incarnation": room.incarnation}


@method("listSandboxes", protocol.ListSandboxesParams)
async def list_sandboxes(ctx: Context, p: protocol.ListSandboxesParams) -> dict[str, Any]:
    rooms = ctx.daemon.rooms
    admin = rooms.is_admin(ctx.uid)
    out = [r.describe(with_owner=admin) for r in rooms.visible_rooms(ctx.uid)
           if r.status == "ready"]
    # The caller's rooms that died and were not yet destroyed or re-made: listed, so that a
    # listing tells what the next call on them will answer.
    out += [{"sandboxId": rid, "status": "dead", "reason": t.reason,
             "incarnation": t.incarnation, "diedAt": iso(t.died_at)}
            for (owner, rid), t in rooms.dead.items() if owner == ctx.uid]
    return {"sandboxes": out}


@method("destroy", protocol.DestroyParams)
async def destroy(ctx: Context, p: protocol.DestroyParams) -> dict[str, Any]:
    destroyed = await ctx.daemon.rooms.destroy(ctx.uid, p.sandbox_id)
    return {"sandboxId": p.sandbox_id, "destroyed": destroyed}
