"""Persistent shell sessions (issue 15; docs/interactive.md, "Sessions").

A session is not a long-lived shell reading lines: it is a *state file* in the room, and every
call in it is an ordinary run (its own cgroup, limits, verdict, kill-the-tree timeout) of a fresh
bash that sources the state, runs the line at its top level, and writes the state back — the
cwd, the variables (exported or not), the functions and the aliases. Why not one shell: a timeout
or a limit must kill the command's tree and spare the session, and a line may be a builtin loop
(``while :; do :; done``) that runs *in* the shell, which could not be killed without killing
the session. Here a killed call leaves the state as it was before it.

Where the state lives: ``/tmp/.sandboxd/session-<id>/state``. /tmp/.sandboxd is the init's (a
mount point owned by an id nobody runs as; jail/fileops.py, "the code-run cache"): only the init
makes the directory, owned by the room's root, mode 0755, so the sandbox user cannot plant code
in a session's state. Sessions run as the room's root, like a default exec.

A line that exits the shell (``exit 3``, a failing command under ``set -e``) runs the EXIT trap,
which removes the state file; the daemon finds it gone after the run, forgets the session and
says so in the result (``sessionEnded``). Calls in one session run one at a time, in arrival
order (asyncio.Lock is FIFO). A call's own ``cwd`` and ``env`` apply to that call only: after the
line the variables it named get their session values back, and the session's cwd stays unless
the line itself changed directory.

``startProcess`` and ``openTerminal`` with a sessionId start from the state (read, never
written back): a program through ``exec "$@"``, a shell form line through ``eval``, a terminal's
default shell as ``bash --rcfile`` of it (so functions and aliases are there too).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import errors, protocol, roomfiles, runs
from .jail import messages as jm

if TYPE_CHECKING:
    from .rooms import Room, RoomManager

SHELL = "/bin/bash"
#: a new session's shell runs this long at most (it only writes the state file)
CREATE_TIMEOUT_MS = 10_000
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Shell variables that are bash's own (read-only, per-process or meaningless in another shell):
# not saved. Everything else the line left set is.
_SAVE = r"""
__sbx_save() {
    for __sbx_n in $(compgen -v); do
        case $__sbx_n in
            __sbx*|BASH*|COMP_*|EPOCH*|EUID|UID|PPID|SHELLOPTS|RANDOM|SRANDOM|SECONDS) ;;
            LINENO|HISTCMD|FUNCNAME|GROUPS|PIPESTATUS|DIRSTACK|_|OPTIND|OPTARG|SHLVL|PWD) ;;
            COLUMNS|LINES) ;;
            *) declare -p "$__sbx_n" 2>/dev/null ;;
        esac
    done
    for __sbx_n in $(compgen -A function); do
        case $__sbx_n in __sbx*) ;; *) declare -f "$__sbx_n" ;; esac
    done
    alias -p
    printf 'cd -- %q 2>/dev/null\n' "$PWD"
}
__sbx_write() { (umask 077; __sbx_save > "$__sbx_s.new") && mv -f -- "$__sbx_s.new" "$__sbx_s"; }
"""

# $1 state file, $2 the directory to start in.
_CREATE = _SAVE + r"""
__sbx_s=$1
cd -- "$2" || exit 1
__sbx_write
"""

# $1 state, $2 the line, $3 / $4 the call's env set-up and undo, $5 the call's cwd (or "").
# The undo runs at the top level: `declare` in a function would make the variables local.
_EXEC = _SAVE + r"""
__sbx_s=$1 __sbx_line=$2 __sbx_pre=$3 __sbx_post=$4 __sbx_cwd=$5
shift 5
[ -f "$__sbx_s" ] || { echo "sandboxd: this session's state is gone" >&2; exit 125; }
shopt -s expand_aliases
. "$__sbx_s" 2>/dev/null
__sbx_home=$PWD
if [ -n "$__sbx_cwd" ]; then cd -- "$__sbx_cwd" || exit 1; fi
__sbx_here=$PWD
eval "$__sbx_pre"
trap 'rm -f -- "$__sbx_s"' EXIT
eval "$__sbx_line"
__sbx_rc=$?
trap - EXIT
eval "$__sbx_post"
if [ -n "$__sbx_cwd" ] && [ "$PWD" = "$__sbx_here" ]; then cd -- "$__sbx_home" 2>/dev/null; fi
__sbx_write
exit $__sbx_rc
"""

# $1 state, $2 the call's env set-up, $3 its cwd (or ""), $4 mode: argv (then the program and
# its arguments), line (then the line) or shell (an interactive bash).
_START = r"""
__sbx_s=$1 __sbx_pre=$2 __sbx_cwd=$3 __sbx_mode=$4
shift 4
[ -f "$__sbx_s" ] || { echo "sandboxd: this session's state is gone" >&2; exit 125; }
if [ "$__sbx_mode" = shell ]; then
    __sbx_cd=
    if [ -n "$__sbx_cwd" ]; then printf -v __sbx_cd 'cd -- %q' "$__sbx_cwd"; fi
    printf -v __sbx_rc '. %q 2>/dev/null\n%s\n%s\nexec 9<&-\nunset __sbx_rc\n' \
        "$__sbx_s" "$__sbx_cd" "$__sbx_pre"
    exec "$BASH" --rcfile /dev/fd/9 -i 9<<<"$__sbx_rc"
fi
shopt -s expand_aliases
. "$__sbx_s" 2>/dev/null
if [ -n "$__sbx_cwd" ]; then cd -- "$__sbx_cwd" || exit 1; fi
eval "$__sbx_pre"
unset __sbx_s __sbx_pre __sbx_cwd
if [ "$__sbx_mode" = line ]; then
    __sbx_line=$1
    unset __sbx_mode
    eval "$__sbx_line"
else
    unset __sbx_mode
    exec "$@"
fi
"""


@dataclass(eq=False)
class Session:
    id: str
    room: Room
    created_at: float = field(default_factory=time.time)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    calls: int = 0

    @property
    def dirname(self) -> str:
        return f"session-{self.id}"

    @property
    def state(self) -> str:
        return f"{roomfiles.CODE_BASE}/{self.dirname}/state"

    def info(self) -> protocol.SessionInfo:
        from .rooms import iso
        return protocol.SessionInfo(session_id=self.id, sandbox_id=self.room.id,
                                    created_at=iso(self.created_at), busy=self.lock.locked(),
                                    calls=self.calls)


def check_user(user: str) -> None:
    """Sessions are the room root's (their state is mode 0600, in a directory only the init
    makes): another user naming one is refused, not run without its state."""
    if user != "root":
        raise errors.ValidationError("a session's shell runs as root: sessionId with user "
                                     f"{user!r}", user=user)


def lookup(room: Room, session_id: str) -> Session:
    sess = room.sessions.get(session_id)
    if sess is None:
        raise errors.SessionNotFound(f"no session {session_id} in sandbox {room.id}",
                                     sessionId=session_id, sandboxId=room.id)
    return sess


def env_code(env: Mapping[str, str | None] | None) -> tuple[str, str]:
    """The shell lines that give a call its own ``env`` (null unsets) and, after it, give those
    variables back their session values."""
    if not env:
        return "", ""
    for name in env:
        if not _NAME.match(name):
            raise errors.ValidationError(f"env: {name!r} is not a shell variable name "
                                         "(a session's line runs in bash)", name=name)
    names = " ".join(env)
    pre = [f"__sbx_keep=$(declare -p {names} 2>/dev/null)"]
    pre += [f"export {k}={shlex.quote(v)}" if v is not None else f"unset {k}"
            for k, v in env.items()]
    return "\n".join(pre), f'unset {names}\neval "$__sbx_keep"'


async def _has_bash(room: Room) -> bool:
    reply, _ = await roomfiles.init_op(room, jm.Exists(path=SHELL), SHELL)
    return reply.exists


async def create(rooms: RoomManager, uid: int, room_id: str, session_id: str | None, *,
                 cwd: str | None, env: Mapping[str, str | None] | None,
                 check_limits: Callable[[protocol.RunLimits, int | None], None]) -> Session:
    room = await rooms.get_or_create(uid, room_id)
    sid = session_id or f"s-{secrets.token_hex(6)}"
    if sid in room.sessions:
        raise errors.SessionExists(f"sandbox {room.id} has a session {sid}", sessionId=sid,
                                   sandboxId=room.id)
    limit = rooms.config.max_sessions_per_room
    if len(room.sessions) >= limit:
        raise errors.QuotaExceeded("too many sessions in this sandbox", limit=limit,
                                   sandboxId=room.id, scope="sessions")
    sess = Session(sid, room)
    room.sessions[sid] = sess  # held before the awaits: a second create of the id is refused
    try:
        if not await _has_bash(room):
            raise errors.LimitUnavailable(f"sessions need {SHELL} in the sandbox's tree",
                                          limit="sessions", sandboxId=room.id)
        await roomfiles.code_op(room, "prepare", sess.dirname)
        res = await runs.run_in_room(
            rooms, uid, room_id, [SHELL, "-c", _CREATE, "bash", sess.state, cwd or "/workspace"],
            check_limits=check_limits, env=env, cwd=None, stdin=b"", user="root", limits=None,
            timeout_ms=CREATE_TIMEOUT_MS, on_output=None)
        if res.status != "OK":
            raise errors.ValidationError(
                f"createSession: {res.stderr.strip() or res.error or res.status}",
                cwd=cwd, status=res.status)
    except BaseException:
        if room.sessions.get(sid) is sess:
            del room.sessions[sid]
        await _remove_state(sess)
        raise
    return sess


async def _remove_state(sess: Session) -> None:
    try:
        await roomfiles.code_op(sess.room, "remove", sess.dirname)
    except errors.SandboxError:
        pass  # the room went, or is going, with it


async def delete(room: Room, session_id: str) -> Session:
    sess = lookup(room, session_id)
    del room.sessions[session_id]
    await _remove_state(sess)
    return sess


async def run_line(rooms: RoomManager, uid: int, room_id: str, session_id: str,
                   argv: list[str] | None, line: str, *,
                   check_limits: Callable[[protocol.RunLimits, int | None], None],
                   env: Mapping[str, str | None] | None, cwd: str | None, stdin: bytes,
                   limits: protocol.RunLimits | None, timeout_ms: int | None,
                   on_output: runs.OutputCallback | None) -> tuple[runs.RunResult, bool]:
    """``exec`` in a session: ``line`` (shell form; its changes kept) or ``argv`` (run from the
    session's state, which it cannot change). Returns the run and whether the session ended."""
    room = await rooms.get_or_create(uid, room_id)
    sess = lookup(room, session_id)
    pre, post = env_code(env)
    if argv is None:
        wrapped = [SHELL, "-c", _EXEC, "bash", sess.state, line, pre, post, cwd or ""]
    else:
        wrapped = [SHELL, "-c", _START, "bash", sess.state, pre, cwd or "", "argv", *argv]
    async with sess.lock:
        if room.sessions.get(session_id) is not sess:  # deleted while this call waited
            raise errors.SessionNotFound(f"no session {session_id} in sandbox {room.id}",
                                         sessionId=session_id, sandboxId=room.id)
        res = await runs.run_in_room(
            rooms, uid, room_id, wrapped, check_limits=check_limits, env=None, cwd=None,
            stdin=stdin, user="root", limits=limits, timeout_ms=timeout_ms, on_output=on_output)
        sess.calls += 1
        reply, _ = await roomfiles.init_op(room, jm.Exists(path=sess.state), sess.state)
        ended = not reply.exists
        if ended and room.sessions.get(session_id) is sess:
            del room.sessions[session_id]
            await _remove_state(sess)
    return res, ended


async def start_argv(rooms: RoomManager, uid: int, room_id: str, session_id: str,
                     argv: list[str] | None, line: str | None, *,
                     env: Mapping[str, str | None] | None, cwd: str | None) -> list[str]:
    """The argv that starts a background process or a terminal from a session's state:
    ``argv`` (a program), ``line`` (shell form) or neither (an interactive bash)."""
    room = await rooms.get_or_create(uid, room_id)
    sess = lookup(room, session_id)
    pre, _ = env_code(env)
    head = [SHELL, "-c", _START, "bash", sess.state, pre, cwd or ""]
    if argv is not None:
        return [*head, "argv", *argv]
    if line is not None:
        return [*head, "line", line]
    return [*head, "shell"]
