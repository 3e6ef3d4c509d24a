"""Background processes: programs a room keeps running between calls (issue 13).

Theory of operation. A background process is a run (``runs.run``: its own cgroup
``room-<id>/runs/run-<r>`` with the run limits it asked for, its pipes, the watchdog and exec's
verdict) whose caller is not a request but a task the room owns (``Room.track``). So it
survives the client that started it (a disconnect cancels request tasks, never this one) and
later execs (an exec kills what *it* left, in its own cgroup), and it ends when

- its program exits (whatever the program left in its cgroup is killed then, as for exec: a
  process is over when its program is; a server that daemonizes must be run in the foreground),
- ``killProcess`` / ``killAllProcesses``: the signal goes to every process of its cgroup
  (setsid'd and double-forked ones included, pinned by pidfds; then SIGCONT, so stopped ones
  act on it) and to its process group, and whatever is left ``KILL_GRACE_S`` later is killed
  through the cgroup (cgroup.kill, or the v1 freezer + SIGKILL),
- a limit of its own (wallTimeMs, cpuTimeMs, outputBytes, memoryBytes: exec's verdicts),
- the room going (destroy, daemon shutdown, the init's death; never the idle reaper, for which
  a live process is activity): the init's pid namespace dies with it, the init channel's close
  fails the run's exit future, the run's cgroup is removed by ``runs._finish``, and the room's
  teardown waits for the task (``Room.settle``).

While it lives, a process counts as one of the room's active runs: against ``max_runs_per_room``
and ``max_runs_per_uid``, for the spawn fast path's "another run is live" rule, and as activity
for the idle reaper; ``max_processes_per_room`` bounds live processes on top of that.

Output. Each stream (stdout, stderr) is read by the run's pump straight into a
:class:`LogRing` of ``process_log_bytes``: the newest bytes, with absolute offsets (a byte's
offset is its position in the stream since the start, never reused), so a reader that passes
back the offsets it got reads every byte exactly once, and learns (``truncated``) when bytes it
had not read were dropped. The pump never waits for a client: a slow streamer falls behind
and, past the ring, skips what was dropped; the program never blocks on its pipe.

Records. The room's :class:`ProcessTable` keeps every live process and the newest
``max_ended_processes_per_room`` ended ones (oldest dropped first). Log memory per room is
bounded by ``max_process_log_bytes_per_room``: a live process reserves two full rings, an ended
one holds what its rings hold; a start that would pass the bound drops the oldest ended records
first and is QUOTA_EXCEEDED only when the live ones fill it.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import importlib
import itertools
import logging
import re
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from . import errors, protocol, runs
from .jail import JailError
from .rooms import iso

if TYPE_CHECKING:
    from .rooms import Room, RoomManager

log = logging.getLogger("sandboxd.processes")

#: After killProcess's signal, whatever is left of the tree this much later is killed.
KILL_GRACE_S = 2.0
#: How long a kill waits for the run to report its end (its cgroup killed: the exit is quick).
KILL_WAIT_S = 10.0
#: One process.output notification carries at most this many bytes of a stream.
STREAM_CHUNK = 64 * 1024
#: No output cap unless the process asks for one (limits.outputBytes): the rings bound memory.
UNCAPPED = protocol.MAX_BYTES
STREAMS = ("stdout", "stderr")


class LogRing:
    """The newest ``cap`` bytes of one stream, addressed by absolute offsets."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.buf = bytearray()
        self.start = 0  # the offset of buf[0]: every byte before it was dropped

    @property
    def end(self) -> int:
        """The offset of the next byte: how many bytes the stream has produced."""
        return self.start + len(self.buf)

    def append(self, data: bytes) -> None:
        self.buf += data
        over = len(self.buf) - self.cap
        if over > 0:
            del self.buf[:over]
            self.start += over

    def read(self, offset: int, limit: int | None = None) -> tuple[bytes, int, bool]:
        """(bytes from ``offset``, the offset after them, whether bytes at or after ``offset``
        were dropped: then the bytes start at the ring's start). An offset past the end reads
        nothing and stays where the stream is."""
        truncated = offset < self.start
        offset = min(max(offset, self.start), self.end)
        lo = offset - self.start
        hi = len(self.buf) if limit is None else min(len(self.buf), lo + limit)
        data = bytes(self.buf[lo:hi])
        return data, offset + len(data), truncated


def complete_utf8(data: bytes) -> int:
    """The length of ``data`` without a UTF-8 sequence cut short at its end (the rest comes
    with the next read, so that offsets never split a character between two reads)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for the lead byte
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else \
            4 if byte & 0xF8 == 0xF0 else 1
        return len(data) - back if need > back else len(data)
    return len(data)


class ProcessRecord:
    """One background process of a room: its identity, its rings, its fate."""

    def __init__(self, process_id: str, command: str, ring_bytes: int) -> None:
        self.id = process_id
        self.command = command
        self.pid = 0
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.status = "running"
        self.result: runs.RunResult | None = None
        self.error: str | None = None
        #: a refusal found only once the run was being set up (its cgroup's limits)
        self.refused: errors.SandboxError | None = None
        self.rings = {name: LogRing(ring_bytes) for name in STREAMS}
        self.control = runs.RunControl()
        # (here, not in the starting request: a caller gone before the spawn answered must not
        # leave the record without its pid)
        self.control.spawned.add_done_callback(self._spawned)
        self.killed = False  # by killProcess / killAllProcesses
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()

    def _spawned(self, fut: asyncio.Future[int]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.pid = fut.result()

    @property
    def ended(self) -> bool:
        return self.done.done()

    def on_data(self, stream: str, data: bytes) -> None:
        self.rings[stream].append(data)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def change(self) -> asyncio.Event:
        """An event set at the next output (or the end): take it *before* reading."""
        return self._changed

    def held_bytes(self) -> int:
        return sum(len(r.buf) for r in self.rings.values())

    def reserved_bytes(self) -> int:
        """What counts against the room's log bytes: two full rings while it lives."""
        if self.ended:
            return self.held_bytes()
        return sum(r.cap for r in self.rings.values())

    def end(self, status: str, result: runs.RunResult | None = None,
            error: str | None = None) -> None:
        if self.ended:
            return
        self.status = status
        self.result = result
        self.error = error
        self.ended_at = time.time()
        self.done.set_result(None)
        self._wake()

    def info(self) -> protocol.ProcessInfo:
        base = protocol.ProcessInfo(process_id=self.id, pid=self.pid, command=self.command,
                                    status=self.status, started_at=iso(self.started_at))
        if self.ended_at is None:
            return base
        res = self.result
        fields: dict[str, Any] = {"ended_at": iso(self.ended_at)}
        if res is not None:
            fields.update(
                exit_code=res.exit_code, signal=res.signal, verdict=res.status,
                timed_out=res.timed_out, limit_exceeded=res.limit_exceeded,
                oom_killed=res.oom_killed, output_truncated=res.output_truncated,
                cpu_time_ms=res.cpu_time_ms, wall_time_ms=res.wall_time_ms,
                memory_peak_bytes=res.memory_peak_bytes, pids_peak=res.pids_peak)
        error = self.error or (res.error if res is not None else None)
        if error:
            fields["error"] = error
        return msgspec.structs.replace(base, **fields)


class ProcessTable:
    """A room's processes by id, oldest first: every live one, the newest ended ones."""

    def __init__(self) -> None:
        self.records: dict[str, ProcessRecord] = {}
        self.ids = itertools.count(1)

    def live(self) -> list[ProcessRecord]:
        return [p for p in self.records.values() if not p.ended]

    def ended(self) -> list[ProcessRecord]:
        return [p for p in self.records.values() if p.ended]

    def new_id(self) -> str:
        while True:
            pid = f"proc-{next(self.ids)}"
            if pid not in self.records:
                return pid

    def trim(self, keep_ended: int) -> None:
        """Drop the oldest ended records past ``keep_ended``."""
        ended = self.ended()
        for old in ended[:max(0, len(ended) - keep_ended)]:
            del self.records[old.id]

    def make_room_for(self, need: int, budget: int) -> bool:
        """Drop the oldest ended records until ``need`` more bytes fit the room's log budget;
        False if the live ones alone leave too little."""
        def used() -> int:
            return sum(p.reserved_bytes() for p in self.records.values())
        for old in self.ended():
            if used() + need <= budget:
                break
            del self.records[old.id]
        return used() + need <= budget


def make_room_across(tables: list[ProcessTable], need: int, budget: int) -> bool:
    """:meth:`ProcessTable.make_room_for` over several rooms' tables (one uid's): the oldest
    ended records of any of them go first."""
    def used() -> int:
        return sum(p.reserved_bytes() for t in tables for p in t.records.values())
    ended = sorted(((p.ended_at or 0.0, i, p.id) for i, t in enumerate(tables)
                    for p in t.ended()))
    for _, i, pid in ended:
        if used() + need <= budget:
            break
        del tables[i].records[pid]
    return used() + need <= budget


def table(room: Room) -> ProcessTable:
    if room.processes is None:
        room.processes = ProcessTable()
    return room.processes


def lookup(room: Room, process_id: str) -> ProcessRecord:
    """The room's process ``process_id`` (live or a kept ended record); PROCESS_NOT_FOUND."""
    rec = table(room).records.get(process_id)
    if rec is None:
        raise errors.ProcessNotFound(f"no process {process_id} in sandbox {room.id}",
                                     processId=process_id, sandboxId=room.id)
    return rec


async def process_ended(room: Room, process_id: str) -> ProcessRecord | None:
    """The record of ``process_id`` if it has ended, None while it runs (``waitForPort``'s
    PROCESS_EXITED_BEFORE_READY); PROCESS_NOT_FOUND for an id the room does not know."""
    rec = lookup(room, process_id)
    return rec if rec.ended else None


# --- starting ------------------------------------------------------------------------------------


async def start(rooms: RoomManager, uid: int, room_id: str, argv: list[str], command: str, *,
                check_limits: Callable[[protocol.RunLimits, int | None], None],
                env: Mapping[str, str | None] | None, cwd: str | None, user: str,
                limits: protocol.RunLimits | None, process_id: str | None) -> ProcessRecord:
    """Start ``argv`` in the caller's room (made on demand) as background process
    ``process_id`` (a generated id if None); return its record once the init spawned it."""
    room = await rooms.get_or_create(uid, room_id)
    cfg = rooms.config
    procs = table(room)
    if process_id is not None:
        old = procs.records.get(process_id)
        if old is not None and not old.ended:
            raise errors.ProcessExists(f"process {process_id} is running in sandbox {room.id}",
                                       processId=process_id, sandboxId=room.id)
    rec = ProcessRecord(process_id or procs.new_id(), command, cfg.process_log_bytes)
    spec = runs.prepare(rooms, room, argv, check_limits=check_limits, env=env, cwd=cwd,
                        stdin=b"", user=user, limits=limits, timeout_ms=None, on_output=None,
                        output_bytes=UNCAPPED, keep_output=False, on_data=rec.on_data,
                        control=rec.control)
    if len(procs.live()) >= cfg.max_processes_per_room:
        raise errors.QuotaExceeded("too many running processes in this sandbox",
                                   limit=cfg.max_processes_per_room, sandboxId=room.id)
    runs.check_run_quotas(rooms, room, uid)
    if process_id is not None:
        procs.records.pop(process_id, None)  # an ended record of that id: replaced
    if not procs.make_room_for(rec.reserved_bytes(), cfg.max_process_log_bytes_per_room):
        raise errors.QuotaExceeded(
            "the sandbox's running processes hold all its log bytes",
            limit=cfg.max_process_log_bytes_per_room, sandboxId=room.id, scope="logBytes")
    if not rooms.is_admin(uid) and not make_room_across(
            [table(r) for r in rooms.visible_rooms(uid)], rec.reserved_bytes(),
            cfg.max_process_log_bytes_per_uid):
        raise errors.QuotaExceeded(
            "your running processes hold all the log bytes this daemon gives a user",
            limit=cfg.max_process_log_bytes_per_uid, scope="uidLogBytes")
    # From here to the task, nothing awaits: the quotas above cannot be passed twice.
    procs.records[rec.id] = rec
    room.active_runs += 1
    task = asyncio.ensure_future(_supervise(rooms, room, rec, spec))
    room.track(task)
    started = rec.control.spawned
    first: list[asyncio.Future[Any]] = [started, task]
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if started.done() and not started.cancelled() and started.exception() is None:
        rec.pid = started.result()  # (its done callback may not have run yet)
        return rec
    # It never ran: the record says why (status "error"), or the room went under it.
    await asyncio.wait([task])
    err = started.exception() if started.done() and not started.cancelled() else None
    if isinstance(err, JailError) and not room.handle.alive:
        raise await rooms.lost(room, err) from err
    if rec.refused is not None:
        procs.records.pop(rec.id, None)
        raise rec.refused
    return rec


async def _supervise(rooms: RoomManager, room: Room, rec: ProcessRecord,
                     spec: runs.RunSpec) -> None:
    """The process's life: the run, then its record's fate."""
    try:
        res = await runs.run(room, spec)
    except errors.SandboxError as err:  # its cgroup could not be made with its limits
        rec.refused = err
        rec.end("error", error=err.message)
    except JailError as err:
        if room.handle is None or not room.handle.alive or room.status != "ready":
            rec.end("killed", error=f"the sandbox went away: {err}")
        else:
            rec.end("error", error=f"could not start: {err}")
    except asyncio.CancelledError:
        rec.end("killed", error="the daemon stopped")
        raise
    except Exception as err:
        log.exception("room %s: process %s failed", room.key, rec.id)
        rec.end("error", error=f"internal error: {type(err).__name__}")
    else:
        rec.end(_status(rec, res), res)
    finally:
        room.active_runs -= 1
        room.touch()
        table(room).trim(rooms.config.max_ended_processes_per_room)


def _status(rec: ProcessRecord, res: runs.RunResult) -> str:
    if rec.killed:
        return "killed"
    if res.status == "XX" or res.start_failure is not None:
        return "error"
    if res.status in ("TO", "ML", "OL"):
        return "killed"  # by one of its limits: ``limitExceeded`` says which
    return "completed" if res.exit_code == 0 else "failed"


# --- killing -------------------------------------------------------------------------------------


def signal_number(value: int | str | None) -> int:
    """A signal by number or name ("SIGTERM", "term"); SIGTERM by default."""
    if value is None:
        return int(signal.SIGTERM)
    if isinstance(value, int):
        if value not in {int(s) for s in signal.valid_signals()}:
            raise errors.ValidationError(f"no signal {value}", field="signal")
        return value
    name = value.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise errors.ValidationError(f"no signal {value!r}", field="signal") from None


async def kill(room: Room, rec: ProcessRecord, sig: int = signal.SIGTERM) -> ProcessRecord:
    """``sig`` to the process's whole tree, SIGKILL for what is left ``KILL_GRACE_S`` later;
    returns once the process ended (its record: status "killed" unless it had ended)."""
    if rec.ended:
        return rec
    rec.killed = True
    control = rec.control
    if not control.spawned.done():
        either: list[asyncio.Future[Any]] = [control.spawned, rec.done]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if sig != signal.SIGKILL and not rec.ended and control.cgroup is not None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            await loop.run_in_executor(None, control.cgroup.signal, sig)
        # Its process group too: the only handle on it without a cgroup (the disabled backend).
        await room.handle.kill_run(control.run_id, sig)
        await room.handle.kill_run(control.run_id, signal.SIGCONT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(rec.done), KILL_GRACE_S)
    if not rec.ended:
        control.kill("killed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(rec.done), KILL_WAIT_S)
    return rec


async def kill_all(room: Room) -> int:
    """killProcess (SIGTERM) on every live process of the room at once; how many there were."""
    live = table(room).live()
    await asyncio.gather(*(kill(room, p) for p in live))
    return len(live)


# --- output --------------------------------------------------------------------------------------


def read_logs(rec: ProcessRecord, offsets: Mapping[str, int]) -> protocol.ProcessLogs:
    """Each stream from its offset to what is buffered now (see :class:`LogRing`)."""
    text: dict[str, str] = {}
    ends: dict[str, int] = {}
    truncated = False
    for name in STREAMS:
        data, end, cut = rec.rings[name].read(offsets.get(name, 0))
        if not rec.ended:
            keep = complete_utf8(data)
            end -= len(data) - keep
            data = data[:keep]
        text[name] = data.decode("utf-8", "replace")
        ends[name] = end
        truncated = truncated or cut
    return protocol.ProcessLogs(stdout=text["stdout"], stderr=text["stderr"],
                                stdout_offset=ends["stdout"], stderr_offset=ends["stderr"],
                                truncated=truncated)


async def stream(rec: ProcessRecord, offsets: Mapping[str, int],
                 send: Callable[[str, str], Awaitable[None]]) -> ProcessRecord:
    """Replay each stream from its offset, then follow it live (``send(stream, text)``) until
    the process ended and everything it wrote was sent; returns its record."""
    pos = {name: offsets.get(name, 0) for name in STREAMS}
    decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in STREAMS}
    while True:
        changed = rec.change()
        ended = rec.ended  # (read before the rings: what it wrote before ending is in them)
        sent = False
        for name in STREAMS:
            data, pos[name], _cut = rec.rings[name].read(pos[name], STREAM_CHUNK)
            if data:
                sent = True
                text = decoders[name].decode(data)
                if text:
                    await send(name, text)
        if sent:
            continue
        if ended:
            for name in STREAMS:
                tail = decoders[name].decode(b"", final=True)
                if tail:
                    await send(name, tail)
            return rec
        await changed.wait()


#: A regex is searched in at most this much of each line (bounds the polynomial blow-ups that
#: :func:`safe_regex` lets through, such as ``.*a.*b``).
REGEX_LINE_CHARS = 4096
_REPEATS = frozenset({"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"})
_BACKREFS = frozenset({"GROUPREF", "GROUPREF_EXISTS"})


def safe_regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled, if it cannot backtrack exponentially: the daemon searches it in
    its event loop (``re`` holds the GIL: no thread or timeout could stop a runaway search), and
    any tenant may send one. Refused (VALIDATION_FAILED): backreferences, and a repetition
    containing another repetition or an alternation (``(a+)+``, ``(a|aa)*``), the shapes of
    catastrophic backtracking."""
    def refuse(why: str) -> errors.ValidationError:
        return errors.ValidationError(f"regular expression refused: {why}", field="pattern")

    try:
        rx = re.compile(pattern)
        # The stdlib's own parser (what re.compile used): private, hence Any and fail-closed.
        parser: Any = importlib.import_module("re._parser")
        tree = parser.parse(pattern)
    except re.error as err:
        raise errors.ValidationError(f"invalid regular expression: {err}",
                                     field="pattern") from err
    except Exception as err:  # another Python's parser: refuse, never guess
        raise refuse("this daemon cannot check it") from err

    def walk(items: Any, in_repeat: bool) -> None:
        for op, av in items:
            name = str(op)
            if name in _BACKREFS:
                raise refuse("backreferences are not supported")
            if name in _REPEATS:
                _low, high, sub = av
                unbounded = high is parser.MAXREPEAT or high > 1
                if in_repeat and unbounded:
                    raise refuse("a repetition inside a repetition can backtrack without end")
                walk(sub, in_repeat or unbounded)
            elif name == "BRANCH":
                if in_repeat:
                    raise refuse("an alternation inside a repetition can backtrack without end")
                for alt in av[1]:
                    walk(alt, in_repeat)
            elif name in ("SUBPATTERN", "ATOMIC_GROUP"):
                walk(av[-1], in_repeat)
            elif name in ("ASSERT", "ASSERT_NOT"):
                walk(av[1], in_repeat)
    try:
        walk(tree.data, False)
    except errors.ValidationError:
        raise
    except Exception as err:  # a tree of another shape: refuse, never guess
        raise refuse("this daemon cannot check it") from err
    return rx


async def wait_for_log(rec: ProcessRecord, pattern: str, *, regex: bool = False,
                       timeout_ms: int | None = None) -> str:
    """The first line of either stream (buffered or new) containing ``pattern`` (a substring,
    or with ``regex`` a regular expression searched in the line); a last line without its
    newline counts too. PROCESS_EXITED_BEFORE_READY if the process ends without one,
    PROCESS_READY_TIMEOUT past ``timeout_ms``."""
    if regex:
        rx = safe_regex(pattern)

        def matches(line: str) -> bool:
            return rx.search(line[:REGEX_LINE_CHARS]) is not None
    else:
        def matches(line: str) -> bool:
            return pattern in line

    async def scan() -> str:
        pos = {name: rec.rings[name].start for name in STREAMS}
        partial = {name: bytearray() for name in STREAMS}
        while True:
            changed = rec.change()
            ended = rec.ended
            for name in STREAMS:
                ring = rec.rings[name]
                data, pos[name], cut = ring.read(pos[name])
                if cut:
                    partial[name].clear()  # its start was dropped: not a whole line
                buf = partial[name]
                buf += data
                *lines, rest = bytes(buf).split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace")
                    if matches(line):
                        return line.rstrip("\r")
                # A line longer than the ring is matched by what the ring still has of it.
                partial[name] = bytearray(rest[-ring.cap:])
                tail = partial[name].decode("utf-8", "replace")
                if tail and matches(tail):
                    return tail.rstrip("\r")
            if ended:
                res = rec.result
                raise errors.ProcessExitedBeforeReady(
                    f"process {rec.id} ended ({rec.status}) before a line matched",
                    processId=rec.id, status=rec.status,
                    exitCode=res.exit_code if res is not None else None)
            await changed.wait()

    try:
        return await asyncio.wait_for(scan(), timeout_ms / 1000 if timeout_ms else None)
    except TimeoutError:
        raise errors.ProcessReadyTimeout(
            f"no line of process {rec.id} matched within {timeout_ms} ms", processId=rec.id,
            timeout=timeout_ms) from None
