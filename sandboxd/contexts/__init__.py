"""Code interpreter contexts (issue 16, docs/contexts.md): persistent kernels in a room.

Theory of operation. A context is one long-lived *run* in its room (``runs.run``: its own
cgroup ``room-<id>/runs/run-<r>`` with the context's memory limit, owned by a task the room
tracks, so it counts as one of the room's active runs and dies with the room), running a small
driver that ships with sandboxd, passed as an argument (``python3 -c`` / ``node -e``):

  python      ``driver_py.py``: starts one ipykernel and drives it with jupyter_client over
              ipc transport (Unix sockets in a private directory of the room's /tmp: the room's
              network namespace is not involved)
  javascript  ``driver_js.js``: node:repl's evaluator in a vm context of its own
  typescript  the same, each cell transpiled by the tree's typescript (transpileModule)

The driver speaks JSON lines: the daemon writes commands to the run's stdin (a pipe it keeps:
``RunSpec.stdin_fd``) and reads events from the run's stdout (``RunSpec.stdout_fd``); the run's
stderr (the kernel's own noise) is counted and dropped. The driver is code in the room: its
lines are parsed as bounded JSON (a line over MAX_LINE, or one that is not an object, kills the
driver) and every field is checked before it reaches the wire.

Cells run one at a time per context (``lock``, FIFO). A cell's timeout (or its cpuTimeMs)
interrupts it (Python: SIGINT to the kernel through jupyter_client; JavaScript: SIGINT to the
driver, which breaks a synchronous loop) and the state is kept; if it does not stop within
``context_grace_ms`` the driver is killed (its whole cgroup) and the context is ``stopped``:
the error is ``ContextRestarted`` and the next cell starts a fresh kernel. A kernel the OOM
killer chose (the run's memory.events) is reported as ``MemoryLimitExceeded``, the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from .. import errors, protocol, runs
from ..jail import JailError

if TYPE_CHECKING:
    from ..rooms import Room, RoomManager

log = logging.getLogger("sandboxd.contexts")

LANGUAGES = ("python", "javascript", "typescript")
#: one event line from a driver (a PNG of a large figure is a few MiB of base64)
MAX_LINE = 32 * 1024 * 1024
#: how long a new driver may take to say it is ready (ipykernel + imports, on a slow machine)
START_TIMEOUT_S = 60.0
#: how long a killed driver may take to report its end
KILL_WAIT_S = 10.0
#: a cell's logs kept in its result (beyond: the rest is dropped, the last entry says so)
MAX_LOG_BYTES = 16 * 1024 * 1024
#: a cell's results kept (beyond: dropped, and a text/plain bundle says so)
MAX_RESULT_BYTES = 64 * 1024 * 1024
_JS_LAUNCH = 'exec node -e "$1" -- "$2" 3>&1 1>&2'

OnOutput = Callable[[str, str], Awaitable[None]]
OnResult = Callable[[dict[str, Any]], Awaitable[None]]


def _source(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def driver_argv(language: str) -> list[str]:
    if language == "python":
        return ["/usr/bin/python3", "-c", _source("driver_py.py")]
    return ["/bin/sh", "-c", _JS_LAUNCH, "sh", _source("driver_js.js"), language]


def _error(name: str, value: str, tb: list[str] | None = None) -> protocol.ContextError:
    return protocol.ContextError(name=name, value=value, traceback=tb or [])


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class DriverGone(Exception):
    """The driver's run ended (killed, crashed, OOM) or broke the line protocol."""


class Driver:
    """One run of a driver: its command pipe, its event queue, its run task."""

    def __init__(self, ctx: CodeContext) -> None:
        self.ctx = ctx
        self.control = runs.RunControl()
        self.events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.cmd_w = -1
        self.task: asyncio.Future[None] | None = None
        self.reader: asyncio.Future[None] | None = None
        self.ended = False
        self.result: runs.RunResult | None = None

    async def start(self, rooms: RoomManager, uid: int,
                    check_limits: Callable[[protocol.RunLimits, int | None], None]) -> None:
        ctx, room = self.ctx, self.ctx.room
        runs.check_run_quotas(rooms, room, uid)
        limits = protocol.RunLimits(memory_bytes=ctx.limits.memory_bytes) \
            if ctx.limits.memory_bytes is not None else None
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            spec = runs.prepare(
                rooms, room, driver_argv(ctx.language), check_limits=check_limits, env=ctx.env,
                cwd=ctx.cwd, stdin=b"", user="root", limits=limits, timeout_ms=None,
                on_output=None, output_bytes=protocol.MAX_BYTES, keep_output=False,
                control=self.control, stdin_fd=in_r, stdout_fd=out_w)
        except BaseException:
            for fd in (in_r, in_w, out_r, out_w):
                os.close(fd)
            raise
        os.set_blocking(in_w, False)
        self.cmd_w = in_w
        room.active_runs += 1
        self.task = asyncio.ensure_future(self._supervise(spec, in_r, out_w))
        room.track(self.task)
        self.reader = asyncio.ensure_future(self._read(out_r))
        room.track(self.reader)
        try:
            await self.control.spawned
        except JailError as err:
            self._close_cmd()
            if not room.handle.alive:
                raise await rooms.lost(room, err) from err
            raise errors.InternalError(f"sandbox {room.id}: the context's driver did not "
                                       f"start: {err}") from err
        try:
            ev = await asyncio.wait_for(self.next_event(), START_TIMEOUT_S)
        except (TimeoutError, DriverGone) as err:
            await self.kill()
            why = "did not start in time" if isinstance(err, TimeoutError) else "ended"
            raise errors.LimitUnavailable(
                f"the {ctx.language} context's kernel {why} (does the sandbox's tree have "
                f"{'python3-ipykernel' if ctx.language == 'python' else 'node'}?)",
                limit="contexts", language=ctx.language, sandboxId=room.id) from err
        if ev.get("ev") != "ready":
            await self.kill()
            raise errors.InternalError(f"sandbox {room.id}: the context's driver said "
                                       f"{str(ev.get('ev'))[:64]!r} before ready")

    async def _supervise(self, spec: runs.RunSpec, in_r: int, out_w: int) -> None:
        room = self.ctx.room

        def spawned(_f: asyncio.Future[int]) -> None:
            # The driver has its ends now (or never will): ours must go, or its stdout would
            # never reach EOF once it is gone.
            os.close(in_r)
            os.close(out_w)

        self.control.spawned.add_done_callback(spawned)
        try:
            self.result = await runs.run(room, spec)
        except (JailError, errors.SandboxError) as err:
            log.info("room %s: context %s: its driver ended with its run: %s", room.key,
                     self.ctx.id, err)
        except Exception:
            log.exception("room %s: context %s: the driver's run failed", room.key, self.ctx.id)
        finally:
            if not self.control.spawned.done():
                self.control.spawned.set_exception(JailError("the driver's run did not start"))
            room.active_runs -= 1
            room.touch()
            self.ended = True
            self._close_cmd()
            self.events.put_nowait(None)

    async def _read(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # over MAX_LINE
                    log.warning("context %s: driver line over %d bytes", self.ctx.id, MAX_LINE)
                    break
                if not line:
                    break
                try:
                    ev = json.loads(line)
                except ValueError:
                    log.warning("context %s: driver wrote a line that is not JSON", self.ctx.id)
                    break
                if not isinstance(ev, dict):
                    break
                self.events.put_nowait(ev)
        finally:
            transport.close()
            self.events.put_nowait(None)
            if not self.ended:
                self.control.kill("protocol")

    async def next_event(self) -> dict[str, Any]:
        ev = await self.events.get()
        if ev is None:
            self.events.put_nowait(None)  # (every later reader sees the end too)
            raise DriverGone()
        return ev

    def _close_cmd(self) -> None:
        if self.cmd_w >= 0:
            with contextlib.suppress(OSError):
                os.close(self.cmd_w)
            self.cmd_w = -1

    async def send(self, cmd: dict[str, Any]) -> None:
        data = memoryview((json.dumps(cmd) + "\n").encode())
        loop = asyncio.get_running_loop()
        while data:
            if self.cmd_w < 0:
                raise DriverGone()
            try:
                n = os.write(self.cmd_w, data)
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                fd = self.cmd_w
                loop.add_writer(fd, _wake, ready)
                try:
                    await asyncio.wait_for(ready, 1.0)
                except TimeoutError:
                    pass
                finally:
                    loop.remove_writer(fd)
                continue
            except OSError as err:  # EPIPE: the driver is gone
                raise DriverGone() from err
            data = data[n:]

    async def interrupt(self) -> None:
        if self.ctx.language == "python":
            with contextlib.suppress(DriverGone):
                await self.send({"op": "interrupt"})
        elif self.control.run_id and not self.ended:
            await self.ctx.room.handle.kill_run(self.control.run_id, signal.SIGINT)

    def oom(self) -> bool:
        cg = self.control.cgroup
        try:
            return cg is not None and cg.oom_killed()
        except OSError:
            return False

    def cpu_ns(self) -> int:
        cg = self.control.cgroup
        try:
            return cg.cpu_usage_ns() if cg is not None else 0
        except OSError:
            return 0

    async def kill(self) -> None:
        self.control.kill("closed")
        self._close_cmd()
        if self.task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.task), KILL_WAIT_S)


@dataclass(eq=False)
class CodeContext:
    id: str
    room: Room
    language: str
    cwd: str
    env: Mapping[str, str | None] | None
    limits: protocol.ContextLimits
    created_at: float = field(default_factory=time.time)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    driver: Driver | None = None
    executions: int = 0
    cell_ids: int = 0
    deleted: bool = False

    def info(self) -> protocol.CodeContextInfo:
        from ..rooms import iso
        live = self.driver is not None and not self.driver.ended
        status = "busy" if self.lock.locked() else "ready" if live else "stopped"
        return protocol.CodeContextInfo(
            context_id=self.id, sandbox_id=self.room.id, language=self.language, cwd=self.cwd,
            created_at=iso(self.created_at), status=status, executions=self.executions)


def lookup(room: Room, context_id: str) -> CodeContext:
    ctx = room.contexts.get(context_id)
    if ctx is None:
        raise errors.ContextNotFound(f"no code context {context_id} in sandbox {room.id}",
                                     contextId=context_id, sandboxId=room.id)
    return ctx


class Contexts:
    """The room-level calls of code contexts (what ``api/contexts.py`` uses)."""

    def __init__(self, rooms: RoomManager, uid: int,
                 check_limits: Callable[[protocol.RunLimits, int | None], None]) -> None:
        self.rooms, self.uid, self.check_limits = rooms, uid, check_limits

    async def _ensure(self, ctx: CodeContext) -> Driver:
        drv = ctx.driver
        if drv is None or drv.ended:
            drv = Driver(ctx)
            await drv.start(self.rooms, self.uid, self.check_limits)
            ctx.driver = drv
        return drv

    async def create(self, room_id: str, language: str, cwd: str | None,
                     env: Mapping[str, str | None] | None,
                     limits: protocol.ContextLimits | None) -> CodeContext:
        if language not in LANGUAGES:
            raise errors.UnsupportedLanguage(
                f"code contexts speak {', '.join(LANGUAGES)}, not {language!r}",
                language=language, supported=list(LANGUAGES))
        room = await self.rooms.get_or_create(self.uid, room_id)
        limit = self.rooms.config.max_contexts_per_room
        if len(room.contexts) >= limit:
            raise errors.QuotaExceeded("too many code contexts in this sandbox", limit=limit,
                                       sandboxId=room.id, scope="contexts")
        lim = limits or protocol.ContextLimits()
        if lim.memory_bytes is not None and lim.memory_bytes > room.options.limits.memory_bytes:
            raise errors.ValidationError("limits.memoryBytes exceeds the sandbox's memory limit",
                                         limit="memoryBytes",
                                         roomMemoryBytes=room.options.limits.memory_bytes)
        while True:
            cid = f"ctx-{secrets.token_hex(6)}"
            if cid not in room.contexts:
                break
        ctx = CodeContext(cid, room, language, runs.cwd_of(cwd), env, lim)
        room.contexts[cid] = ctx  # held before the awaits: the quota cannot be passed twice
        try:
            async with ctx.lock:
                await self._ensure(ctx)
        except BaseException:
            if room.contexts.get(cid) is ctx:
                del room.contexts[cid]
            if ctx.driver is not None:
                await ctx.driver.kill()
            raise
        return ctx

    async def room(self, room_id: str) -> Room:
        return await self.rooms.get_or_create(self.uid, room_id)

    async def delete(self, room_id: str, context_id: str) -> CodeContext:
        room = await self.room(room_id)
        ctx = lookup(room, context_id)
        del room.contexts[context_id]
        ctx.deleted = True
        if ctx.driver is not None:
            await ctx.driver.kill()
        return ctx

    async def restart(self, room_id: str, context_id: str) -> CodeContext:
        room = await self.room(room_id)
        ctx = lookup(room, context_id)
        drv = ctx.driver
        if drv is not None:
            await drv.kill()  # (a running cell ends as ContextRestarted; then the lock is ours)
        async with ctx.lock:
            if ctx.deleted:
                raise errors.ContextNotFound(f"no code context {context_id} in sandbox "
                                             f"{room.id}", contextId=context_id,
                                             sandboxId=room.id)
            if ctx.driver is drv and drv is not None and not drv.ended:
                await drv.kill()
            ctx.executions = 0
            await self._ensure(ctx)
        return ctx

    async def interrupt(self, room_id: str, context_id: str) -> CodeContext:
        room = await self.room(room_id)
        ctx = lookup(room, context_id)
        if ctx.driver is not None and ctx.lock.locked():
            await ctx.driver.interrupt()
        return ctx

    async def run(self, room_id: str, context_id: str, code: str, timeout_ms: int | None,
                  on_output: OnOutput | None,
                  on_result: OnResult | None) -> protocol.RunInContextResult:
        room = await self.room(room_id)
        ctx = lookup(room, context_id)
        cfg = self.rooms.config
        timeout_ms = timeout_ms or cfg.context_cell_timeout_ms
        async with ctx.lock:
            if ctx.deleted:
                raise errors.ContextNotFound(f"no code context {context_id} in sandbox "
                                             f"{room.id}", contextId=context_id,
                                             sandboxId=room.id)
            drv = await self._ensure(ctx)
            ctx.executions += 1
            ctx.cell_ids += 1
            cell = ctx.cell_ids
            cell_run = _Cell(ctx, drv, cell, on_output, on_result)
            return await cell_run.run(code, timeout_ms, cfg.context_grace_ms)


class _Cell:
    """One runInContext: send the code, collect the events, enforce the time."""

    def __init__(self, ctx: CodeContext, drv: Driver, cell: int, on_output: OnOutput | None,
                 on_result: OnResult | None) -> None:
        self.ctx, self.drv, self.cell = ctx, drv, cell
        self.on_output, self.on_result = on_output, on_result
        self.results: list[dict[str, Any]] = []
        self.logs: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.log_bytes = 0
        self.result_bytes = 0
        self.count: int | None = None

    def _result(self, error: protocol.ContextError | None) -> protocol.RunInContextResult:
        logs = protocol.ContextLogs(stdout=self.logs["stdout"], stderr=self.logs["stderr"])
        if error is None:
            return protocol.RunInContextResult(results=self.results, logs=logs,
                                               execution_count=self.count)
        return protocol.RunInContextResult(results=self.results, logs=logs,
                                           execution_count=self.count, error=error)

    def _gone(self) -> protocol.ContextError:
        """The driver ended under the cell: why, as the cell's error."""
        if self.drv.oom():
            return _error("MemoryLimitExceeded", "the kernel was killed at its memory limit "
                          "and is restarted: the context's state is lost")
        return _error("ContextRestarted", "the kernel ended and is restarted: the context's "
                      "state is lost")

    async def run(self, code: str, timeout_ms: int, grace_ms: int) -> protocol.RunInContextResult:
        drv = self.drv
        try:
            await drv.send({"op": "run", "id": self.cell, "code": code})
        except DriverGone:
            await drv.kill()
            return self._result(self._gone())
        loop = asyncio.get_running_loop()
        cpu_limit = self.ctx.limits.cpu_time_ms
        cpu_start = drv.cpu_ns() if cpu_limit else 0
        deadline = loop.time() + timeout_ms / 1000
        why: str | None = None  # set once interrupted: "timeout" or "cpu"
        while True:
            left = deadline - loop.time()
            wait = min(left, runs.CPU_POLL_S * 2.5) if cpu_limit and why is None else left
            try:
                ev = await asyncio.wait_for(drv.next_event(), max(wait, 0))
            except TimeoutError:
                if why is None and loop.time() < deadline:  # a cpu poll
                    if cpu_limit and drv.cpu_ns() - cpu_start >= cpu_limit * 1e6:
                        why = "cpu"
                        await drv.interrupt()
                        deadline = loop.time() + grace_ms / 1000
                    continue
                if why is None:
                    why = "timeout"
                    await drv.interrupt()
                    deadline = loop.time() + grace_ms / 1000
                    continue
                # It did not stop within the grace period: a fresh kernel next time.
                await drv.kill()
                return self._result(_error(
                    "ContextRestarted", f"the cell did not stop within {grace_ms} ms of its "
                    "interrupt: the kernel was restarted and the context's state is lost"))
            except DriverGone:
                await drv.kill()
                return self._result(self._gone())
            if ev.get("id") != self.cell:
                continue  # (a late event of an earlier cell)
            kind = ev.get("ev")
            if kind == "out":
                await self._out(ev)
            elif kind == "result":
                await self._res(ev)
            elif kind == "restarted":
                # The kernel died and the driver started a new one (Python): the state is gone.
                err = self._gone() if drv.oom() or ev.get("reason") == "died" else _error(
                    "ContextRestarted", "the kernel was restarted")
                if drv.oom():  # the next cell gets a new run (and cgroup) too
                    await drv.kill()
                return self._result(err)
            elif kind == "done":
                count = ev.get("count")
                self.count = count if isinstance(count, int) else None
                return self._result(self._done_error(ev.get("error"), why, timeout_ms))

    def _done_error(self, raw: Any, why: str | None,
                    timeout_ms: int) -> protocol.ContextError | None:
        if not isinstance(raw, dict):
            return None  # (it finished before the interrupt reached it: no error then)
        tb = raw.get("traceback")
        lines = [str(t)[:65536] for t in tb[:1000]] if isinstance(tb, list) else []
        name, value = str(raw.get("name", "Error"))[:256], str(raw.get("value", ""))[:65536]
        if why == "timeout":
            value = f"the cell timed out after {timeout_ms} ms and was interrupted" + (
                f" ({value})" if value else "")
        elif why == "cpu":
            value = (f"the cell used its {self.ctx.limits.cpu_time_ms} ms of CPU time and was "
                     "interrupted") + (f" ({value})" if value else "")
        return _error(name, value, lines)

    async def _out(self, ev: dict[str, Any]) -> None:
        stream = "stderr" if ev.get("stream") == "stderr" else "stdout"
        text = ev.get("text")
        if not isinstance(text, str) or not text:
            return
        if self.log_bytes < MAX_LOG_BYTES:
            self.log_bytes += len(text)
            self.logs[stream].append(text)
            if self.log_bytes >= MAX_LOG_BYTES:
                self.logs[stream].append("\n[sandboxd: further output of this cell dropped]\n")
        if self.on_output is not None:
            await self.on_output(stream, text)

    async def _res(self, ev: dict[str, Any]) -> None:
        data = ev.get("data")
        if not isinstance(data, dict):
            return
        bundle = {k: v for k, v in data.items() if isinstance(k, str) and "/" in k
                  and len(k) <= 128}
        if self.result_bytes >= MAX_RESULT_BYTES:
            return
        # (the line was at most MAX_LINE: its values' sizes bound the bundle's)
        self.result_bytes += sum(len(v) if isinstance(v, str) else len(json.dumps(v))
                                 for v in bundle.values())
        if self.result_bytes >= MAX_RESULT_BYTES:
            bundle = {"text/plain": "[sandboxd: further results of this cell dropped]"}
        self.results.append(bundle)
        if self.on_result is not None:
            await self.on_result(bundle)
