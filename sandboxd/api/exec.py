"""exec: run a command (argv or shell form) in a room, with optional streaming and limits."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .. import errors, protocol, runs
from ..jail import JailError
from ..jail.user import SANDBOX_UID
from . import Context, method

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def base_env(user: str) -> dict[str, str]:
    home = "/root" if user == "root" else "/home/sandbox"
    return {"PATH": DEFAULT_PATH, "HOME": home, "LANG": "C.UTF-8", "USER": user,
            "TMPDIR": "/tmp"}


def cwd_of(path: str | None) -> str:
    if not path:
        return "/workspace"
    protocol.validate_text(path, "cwd")
    return path if path.startswith("/") else f"/workspace/{path}"


async def run_in_room(ctx: Context, room_id: str, argv: list[str], *,
                      env: Mapping[str, str | None] | None,
                      cwd: str | None, stdin: bytes, user: str, limits: protocol.RunLimits | None,
                      timeout_ms: int | None, stream: bool) -> runs.RunResult:
    """The shared path of exec (and later runCode): room, spec, quota, run."""
    daemon = ctx.daemon
    room = await daemon.rooms.get_or_create(ctx.uid, room_id)
    if user == "sandbox" and (room.ids is None or not room.ids.maps(SANDBOX_UID)):
        # Refused up front rather than failing at setresuid in the payload (an XX verdict): the
        # single-id fallback maps only the room's root (docs/security.md, "Identities").
        raise errors.LimitUnavailable(
            "user 'sandbox' needs subordinate ids (this daemon maps a single id: "
            "sandboxctl setup --user <daemon user>, then restart sandboxd)",
            limit="user", idMapping=daemon.ids.mode)
    merged: dict[str, str | None] = {**base_env(user), **room.options.env, **(env or {})}
    full_env = {k: v for k, v in merged.items() if v is not None}
    runs.check_argv(argv, full_env)
    lim = limits or protocol.RunLimits()
    wall = lim.wall_time_ms if lim.wall_time_ms is not None else timeout_ms
    if lim.memory_bytes is not None and lim.memory_bytes > room.options.limits.memory_bytes:
        raise errors.ValidationError("limits.memoryBytes exceeds the sandbox's memory limit",
                                     limit="memoryBytes",
                                     roomMemoryBytes=room.options.limits.memory_bytes)
    daemon.check_run_limits(lim, wall)

    async def on_output(stream_name: str, data: str) -> None:
        await ctx.notify("exec.output", {"requestId": ctx.request_id, "stream": stream_name,
                                         "data": data})

    spec = runs.RunSpec(
        argv=argv, env=full_env, cwd=cwd_of(cwd), user=user, stdin=stdin, wall_time_ms=wall,
        cpu_time_ms=lim.cpu_time_ms, memory_bytes=lim.memory_bytes, pids=lim.pids,
        output_bytes=min(runs.DEFAULT_OUTPUT_BYTES, daemon.config.run_limits_max.output_bytes)
        if lim.output_bytes is None else lim.output_bytes,
        file_size_bytes=lim.file_size_bytes, on_output=on_output if stream else None)
    if room.active_runs >= daemon.config.max_runs_per_room:
        raise errors.QuotaExceeded("too many concurrent runs in this sandbox",
                                   limit=daemon.config.max_runs_per_room, sandboxId=room.id)
    if not daemon.rooms.is_admin(ctx.uid):
        mine = sum(r.active_runs for r in daemon.rooms.visible_rooms(ctx.uid))
        if mine >= daemon.config.max_runs_per_uid:
            raise errors.QuotaExceeded("too many concurrent runs for this user",
                                       limit=daemon.config.max_runs_per_uid, scope="uid")
    room.active_runs += 1
    try:
        return await runs.run(room, spec)
    except JailError as err:
        raise await daemon.rooms.lost(room, err) from err
    finally:
        room.active_runs -= 1
        room.touch()


@method("exec", protocol.ExecParams)
async def exec_(ctx: Context, p: protocol.ExecParams) -> dict[str, Any]:
    started = time.time()
    argv = [p.command, *p.args] if p.args is not None else ["/bin/sh", "-c", p.command]
    res = await run_in_room(ctx, p.sandbox_id, argv, env=p.env, cwd=p.cwd,
                            stdin=(p.stdin or "").encode(), user=p.user, limits=p.limits,
                            timeout_ms=p.timeout, stream=p.stream)
    return {
        "success": res.status == "OK",
        "exitCode": res.exit_code,
        "stdout": res.stdout,
        "stderr": res.stderr,
        "command": p.command if p.args is None else " ".join([p.command, *p.args]),
        "duration": res.wall_time_ms,
        "timestamp": datetime.fromtimestamp(started, UTC).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        **res.report(),
    }
