"""File watch: watch / unwatch (``sandboxd.watches``); events as ``watch.event`` notifications
to the connection that made the watch, which ends with it."""

from __future__ import annotations

from .. import protocol, roomfiles, watches
from ..context import Context


async def watch(ctx: Context, p: protocol.WatchParams) -> protocol.WatchResult:
    w = await watches.start(
        ctx.rooms, ctx.uid, p.sandbox_id, roomfiles.check_path(p.path), recursive=p.recursive,
        include=p.include, exclude=p.exclude, notify=ctx.notify, request_id=ctx.request_id,
        on_close=ctx.on_close)
    return w.result()


async def unwatch(ctx: Context, p: protocol.UnwatchParams) -> protocol.UnwatchResult:
    room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id)
    w = watches.lookup(room, p.watch_id)
    w.close()
    return protocol.UnwatchResult(watch_id=w.id, unwatched=True, events=w.sent,
                                  dropped=w.dropped_total)
