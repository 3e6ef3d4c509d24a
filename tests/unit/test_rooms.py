"""RoomManager without privileges: a fake zygote whose "room inits" are real child processes
speaking the real channel protocol (ready, failed, pong) over a real socketpair, handed to the
manager with a real pidfd. So the manager's own logic runs for real — creation, the pidfd
watcher, tombstones, teardown, quotas, id slices, reconcile — and only the namespaces are
missing (the integration tier has those).

Every test checks the host side too: the init process is gone after a teardown, the room's state
directory is removed, its id slice is free again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import msgspec
import psutil
import pytest

import sandboxd
from sandboxd import config, errors, rooms
from sandboxd.config import RoomLimits
from sandboxd.jail import JailError, channel, messages
from sandboxd.jail.cgroup.disabled import DisabledBackend
from sandboxd.jail.cgroup.interface import CgroupStats, RoomCgroup, RunCgroupLimits
from sandboxd.jail.user import IdMap, IdPlan

# The fake init: says what its mode tells it to, then answers pings until its channel closes.
# It speaks the real messages (jail/messages.py); one test-only convention: Kill of run "exit"
# makes it exit with status ``sig`` (a room init that crashes under its room).
INIT = r"""
import os, socket, sys
from sandboxd.jail import channel, messages
sock = socket.socket(fileno=int(sys.argv[1]))
mode = sys.argv[2]
if mode == "fail":
    channel.send(sock, messages.Failed(error="no rootfs here"))
    sys.exit(1)
if mode == "exit":
    sys.exit(3)
if mode == "ready":
    channel.send(sock, messages.Ready(pid=1))
# mode "hang": never ready
while True:
    try:
        msg, fds = channel.recv(sock, messages.to_init)
    except (channel.ChannelClosed, channel.BadMessage, OSError):
        break
    for fd in fds:
        os.close(fd)
    if isinstance(msg, messages.Ping):
        channel.send(sock, messages.Pong(re=msg.id))
    elif isinstance(msg, messages.Kill) and msg.run == "exit":
        os._exit(msg.sig)
"""
TOP = os.path.dirname(os.path.dirname(os.path.abspath(sandboxd.__file__)))


class FakeZygote:
    def __init__(self) -> None:
        self.generation = 1
        self.alive = True
        self.mode = "ready"
        self.fail: BaseException | None = None
        self.specs: list[messages.RoomSpec] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.forgotten: list[int] = []
        self.report_status = True

    async def spawn(self, spec: messages.RoomSpec, timeout: float) -> tuple[int, Any, int]:
        self.specs.append(spec)
        if self.fail is not None:
            raise self.fail
        mine, theirs = channel.pair()
        proc = subprocess.Popen([sys.executable, "-c", INIT, str(theirs.fileno()), self.mode],
                                pass_fds=[theirs.fileno()], env={**os.environ, "PYTHONPATH": TOP})
        theirs.close()
        self.procs[proc.pid] = proc
        return proc.pid, mine, os.pidfd_open(proc.pid)

    async def exit_status(self, pid: int, timeout: float) -> int | None:
        proc = self.procs.get(pid)
        if proc is None or not self.report_status:
            return None
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait)
        return -code if code < 0 else code << 8  # a wait status, as the zygote reports it

    def forget(self, pid: int) -> None:
        self.forgotten.append(pid)

    def reap_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


class CountingRoom(RoomCgroup):
    def __init__(self, backend: Backend, key: str) -> None:
        self.backend, self.key = backend, key
        self.room_id, self.path = key, f"/fake/{key}"
        self.enforced, self.accounting = frozenset(), False

    def procs_paths(self) -> list[str]:
        return [f"/fake/{self.key}/init/cgroup.procs"]

    @property
    def joined_by_dir(self) -> bool:
        return False

    def create_run(self, run_id: str, limits: Any = None) -> Any:
        raise AssertionError("no runs here")

    def stats(self) -> CgroupStats:
        return CgroupStats(oom_kills=self.backend.oom_kills)

    def runs_stats(self) -> CgroupStats:
        return self.stats()

    def kill(self) -> None:
        pass

    def destroy(self) -> None:
        self.backend.destroyed.append(self.key)


class Backend(DisabledBackend):
    """The disabled backend's limit checks, with room cgroups that record their removal."""

    def __init__(self) -> None:
        super().__init__("test")
        self.created: list[str] = []
        self.destroyed: list[str] = []
        self.oom_kills = 0
        self.leftovers: list[str] = []

    def create_room(self, room_id: str, limits: RoomLimits) -> RoomCgroup:
        self.created.append(room_id)
        return CountingRoom(self, room_id)

    def reconcile(self, live_room_ids: set[str]) -> list[str]:
        return list(self.leftovers)


class World:
    def __init__(self, d: str, ids: IdPlan | None = None, **settings: Any) -> None:
        self.state = d
        self.cfg = msgspec.structs.replace(
            config.load(None, {"socket": os.path.join(d, "s"), "state_dir": d, "rootfs": "host"}),
            **settings)
        self.zygote = FakeZygote()
        self.backend = Backend()
        self.ids = ids or IdPlan("subordinate", 100000, 100000, slices=4, slice_size=4096)
        self.rm = rooms.RoomManager(self.cfg, self.backend, self.zygote,  # type: ignore[arg-type]
                                    self.ids)


@pytest.fixture
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="sbxrooms-") as d:
        w = World(d)
        yield w
        w.zygote.reap_all()


def run(coro: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(coro())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def until(cond: Callable[[], bool], what: str, tries: int = 2000) -> None:
    """Poll ``cond`` (no wall-clock bound: a count of loop turns); fail saying ``what``."""
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


# --- names and options ----------------------------------------------------------------------------


def test_room_key_short_and_hashed() -> None:
    assert rooms.room_key(1000, "abc") == "u1000-abc"
    long_id = "a" * 63
    k1, k2 = rooms.room_key(1000, long_id), rooms.room_key(1001, long_id)
    assert len(k1) <= 63 and k1.startswith("h1000-aaa") and k1 != k2
    assert rooms.room_key(1000, long_id[:-1] + "b") != k1  # the hash tells them apart
    assert len(rooms.room_key(4294967295, "x" * 63)) == 63


def test_resolve_options_merges_and_checks_ceilings() -> None:
    defaults = RoomLimits(memory_bytes=1 << 28, pids=64)
    opts, asked = rooms.resolve_options({"limits": {"pids": 10}, "env": {"A": "1"}}, defaults)
    assert opts.limits.pids == 10 and opts.limits.memory_bytes == 1 << 28
    assert asked == {"pids"} and opts.env == {"A": "1"}
    assert rooms.resolve_options(None, defaults) == (config.RoomOptions(limits=defaults), set())
    with pytest.raises(errors.InvalidParams, match="must be an object"):
        rooms.resolve_options({"limits": [1]}, defaults)
    with pytest.raises(errors.InvalidParams, match="invalid options"):
        rooms.resolve_options({"limits": {"pids": "many"}}, defaults)
    with pytest.raises(errors.InvalidParams, match="invalid options"):
        rooms.resolve_options({"colour": "red"}, defaults)
    top = config.RoomLimitsMax(memory_bytes=1 << 30, cpus=2.0, pids=100, disk_bytes=1 << 30)
    with pytest.raises(errors.SandboxError, match="pids"):
        rooms.resolve_options({"limits": {"pids": 101}}, defaults, top)
    assert rooms.resolve_options({"limits": {"pids": 100}}, defaults, top)[0].limits.pids == 100


# --- life cycle -----------------------------------------------------------------------------------


def test_create_use_and_destroy(world: World) -> None:
    rm, z, b = world.rm, world.zygote, world.backend

    async def body() -> None:
        room = await rm.get_or_create(1000, "r1", {"env": {"X": "1"}})
        assert room.status == "ready" and room.handle.alive
        assert room.options.env == {"X": "1"} and room.key == "u1000-r1"
        assert b.created == ["u1000-r1"]
        spec = z.specs[0]
        assert spec.room_id == "u1000-r1" and spec.rootfs == "host"
        assert spec.scratch == os.path.join(world.state, "rooms", "u1000-r1", "mnt")
        assert spec.cgroup_procs == ["/fake/u1000-r1/init/cgroup.procs"]
        assert not spec.cgroup_home_by_dir
        assert spec.ids == IdMap(100000, 100000, count=4096, slice=0)
        assert os.path.isdir(spec.scratch)
        with open(os.path.join(room.dir, "room.json")) as f:
            meta = json.load(f)
        assert meta["initPid"] == room.handle.pid and meta["owner"] == 1000
        assert meta["idSlice"] == 0 and meta["initStart"] > 0
        assert isinstance(await room.handle.ping(), messages.Pong)
        # the same id again is the same room: no second init
        assert await rm.get_or_create(1000, "r1") is room and len(z.specs) == 1
        assert rm.get(1000, "r1") is room
        desc = room.describe(with_owner=True)
        assert desc["sandboxId"] == "r1" and desc["owner"] == 1000 and desc["status"] == "ready"
        assert desc["createdAt"].endswith("Z") and "owner" not in room.describe()
        assert room.options_wire()["env"] == {"X": "1"}
        pid, path = room.handle.pid, room.dir
        assert world.ids.held == {0}
        assert await rm.destroy(1000, "r1") is True
        assert room.status == "gone" and gone(pid) and not os.path.exists(path)
        assert b.destroyed == ["u1000-r1"] and z.forgotten == [pid]
        assert world.ids.held == set()
        with pytest.raises(errors.SandboxNotFound):
            rm.get(1000, "r1")
        assert await rm.destroy(1000, "r1") is False
        with pytest.raises(errors.SandboxError):
            await rm.get_or_create(1000, "bad id!")

    run(body)


def test_rooms_are_per_uid_and_admins_see_all(world: World) -> None:
    rm = world.rm

    async def body() -> None:
        a = await rm.get_or_create(1000, "same")
        b = await rm.get_or_create(1001, "same")
        assert a is not b and a.key != b.key and a.ids != b.ids
        assert rm.visible_rooms(1000) == [a] and rm.visible_rooms(1001) == [b]
        assert set(rm.visible_rooms(0)) == {a, b}
        assert rm.is_admin(0) and rm.is_admin(os.getuid()) and not rm.is_admin(1000)
        with pytest.raises(errors.SandboxNotFound):  # no oracle: another uid's id is not found
            rm.get(1002, "same")
        assert await rm.destroy(1002, "same") is False and a.status == "ready"
        await rm.shutdown()

    run(body)


def test_quota_per_uid_and_admin_exempt() -> None:
    with tempfile.TemporaryDirectory() as d:
        w = World(d, ids=IdPlan("single", os.getuid(), os.getgid()), max_rooms_per_uid=1)
        try:
            async def body() -> None:
                await w.rm.get_or_create(1000, "one")
                with pytest.raises(errors.QuotaExceeded):
                    await w.rm.get_or_create(1000, "two")
                await w.rm.get_or_create(1001, "two")  # another tenant's own quota
                admin = os.getuid()
                await w.rm.get_or_create(admin, "a1")
                await w.rm.get_or_create(admin, "a2")
                assert len(w.zygote.specs) == 4
                assert w.zygote.specs[0].ids.count == 1  # the single mapping
                await w.rm.shutdown()

            run(body)
        finally:
            w.zygote.reap_all()


def test_id_slices_run_out_and_come_back() -> None:
    with tempfile.TemporaryDirectory() as d:
        w = World(d, ids=IdPlan("subordinate", 200000, 300000, slices=2, slice_size=4096))
        try:
            async def body() -> None:
                r0 = await w.rm.get_or_create(1000, "a")
                r1 = await w.rm.get_or_create(1000, "b")
                assert {r0.ids.slice, r1.ids.slice} == {0, 1}  # type: ignore[union-attr]
                assert r1.ids.uid_base == 204096 and r1.ids.gid_base == 304096  # type: ignore[union-attr]
                with pytest.raises(errors.QuotaExceeded, match="no free id slice"):
                    await w.rm.get_or_create(1000, "c")
                assert ("1000", "c") not in w.rm.rooms and (1000, "c") not in w.rm.rooms
                await w.rm.destroy(1000, "a")
                r2 = await w.rm.get_or_create(1000, "c")
                assert r2.ids.slice == 0  # type: ignore[union-attr]
                await w.rm.shutdown()
                assert w.ids.held == set()

            run(body)
        finally:
            w.zygote.reap_all()


def test_an_unenforceable_limit_is_refused_before_anything_is_made(world: World) -> None:
    async def body() -> None:
        with pytest.raises(errors.SandboxError) as info:
            await world.rm.get_or_create(1000, "lim", {"limits": {"memoryBytes": 1 << 28}})
        assert info.value.code == "LIMIT_UNAVAILABLE"
        assert world.zygote.specs == [] and world.rm.rooms == {}

    run(body)


@pytest.mark.parametrize("mode", ["fail", "exit"])
def test_an_init_that_fails_set_up_leaves_nothing(world: World, mode: str) -> None:
    world.zygote.mode = mode

    async def body() -> None:
        with pytest.raises(errors.InternalError, match="could not create sandbox r"):
            await world.rm.get_or_create(1000, "r")
        pid = next(iter(world.zygote.procs))
        assert gone(pid) and world.rm.rooms == {} and world.ids.held == set()
        assert not os.path.exists(os.path.join(world.state, "rooms", "u1000-r"))
        assert world.backend.destroyed == ["u1000-r"]
        # no tombstone: the next try is a fresh room
        world.zygote.mode = "ready"
        room = await world.rm.get_or_create(1000, "r")
        assert room.incarnation == 1
        await world.rm.shutdown()

    run(body)


class Unusual(BaseException):
    """Not an Exception (like a cancellation): the teardown must still run."""


def test_a_zygote_that_cannot_spawn_is_an_internal_error(world: World) -> None:
    world.zygote.fail = JailError("room set-up failed: no")

    async def body() -> None:
        with pytest.raises(errors.InternalError, match="room set-up failed"):
            await world.rm.get_or_create(1000, "r")
        assert world.rm.rooms == {} and world.ids.held == set()
        assert world.backend.destroyed == ["u1000-r"]
        world.zygote.fail = errors.QuotaExceeded("stop", limit=1)  # a SandboxError passes as is
        with pytest.raises(errors.QuotaExceeded):
            await world.rm.get_or_create(1000, "r")
        world.zygote.fail = Unusual()
        with pytest.raises(Unusual):
            await world.rm.get_or_create(1000, "r")
        assert world.rm.rooms == {} and world.ids.held == set()

    run(body)


def test_an_init_that_never_gets_ready_times_out_and_is_killed() -> None:
    with tempfile.TemporaryDirectory() as d:
        w = World(d, room_start_timeout_s=0.3)
        w.zygote.mode = "hang"
        try:
            async def body() -> None:
                with pytest.raises(errors.InternalError):
                    await w.rm.get_or_create(1000, "slow")
                pid = next(iter(w.zygote.procs))
                assert gone(pid) and w.rm.rooms == {} and w.ids.held == set()

            run(body)
        finally:
            w.zygote.reap_all()


def test_concurrent_gets_share_one_creation(world: World) -> None:
    async def body() -> None:
        got = await asyncio.gather(*(world.rm.get_or_create(1000, "shared") for _ in range(5)))
        assert all(r is got[0] for r in got) and len(world.zygote.specs) == 1
        await world.rm.shutdown()

    run(body)


def test_destroy_during_creation(world: World) -> None:
    world.zygote.mode = "hang"

    async def body() -> None:
        creating = asyncio.ensure_future(world.rm.get_or_create(1000, "doomed"))
        await until(lambda: bool(world.zygote.procs), "the init was spawned")
        await until(lambda: world.rm.rooms[(1000, "doomed")].handle is not None,
                    "the room got its handle")
        assert await world.rm.destroy(1000, "doomed") is True
        with pytest.raises(errors.SandboxUnavailable) as info:
            await creating
        assert info.value.context["reason"] == "destroyed"
        assert gone(next(iter(world.zygote.procs))) and world.rm.rooms == {}
        assert world.ids.held == set()

    run(body)


# --- deaths and tombstones ------------------------------------------------------------------------


async def _die(world: World, room: rooms.Room, how: Callable[[int], None]) -> rooms.Tombstone:
    how(room.handle.pid)
    key = (room.owner, room.id)
    await until(lambda: key in world.rm.dead and room.status == "gone", "the room was buried")
    return world.rm.dead[key]


def test_a_killed_init_leaves_a_tombstone_until_get_sandbox(world: World) -> None:
    rm = world.rm

    async def body() -> None:
        room = await rm.get_or_create(1000, "k")
        path = room.dir
        tomb = await _die(world, room, lambda pid: os.kill(pid, signal.SIGKILL))
        assert (tomb.reason, tomb.incarnation) == ("killed", 1)
        assert "SIGKILL" in tomb.detail and not os.path.exists(path)
        assert world.ids.held == set()
        with pytest.raises(errors.SandboxUnavailable) as info:
            rm.get(1000, "k")
        assert info.value.context["reason"] == "killed"
        with pytest.raises(errors.SandboxUnavailable):
            await rm.get_or_create(1000, "k")  # any method but getSandbox
        lost = await rm.lost(room, OSError("channel broke"))
        assert isinstance(lost, errors.SandboxUnavailable) and lost.context["reason"] == "killed"
        again = await rm.get_or_create(1000, "k", explicit=True)
        assert again.incarnation == 2 and again is not room and (1000, "k") not in rm.dead
        # destroying a tombstone is success, and forgets it
        tomb2 = await _die(world, again, lambda pid: os.kill(pid, signal.SIGTERM))
        assert tomb2.reason == "killed" and "SIGTERM" in tomb2.detail and tomb2.incarnation == 2
        assert await rm.destroy(1000, "k") is True and rm.dead == {}
        with pytest.raises(errors.SandboxNotFound):
            rm.get(1000, "k")

    run(body)


def test_death_reasons(world: World) -> None:
    rm, z = world.rm, world.zygote

    async def body() -> None:
        room = await rm.get_or_create(1000, "c")
        with pytest.raises(JailError, match="is gone"):  # it exits instead of answering
            await room.handle.request(messages.Kill(run="exit", sig=3), timeout=None)
        await until(lambda: (1000, "c") in rm.dead, "the crashed room was buried")
        assert (rm.dead[(1000, "c")].reason, rm.dead[(1000, "c")].detail) == (
            "crashed", "the room init exited with status 3")

        world.backend.oom_kills = 1
        room = await rm.get_or_create(1000, "o")
        tomb = await _die(world, room, lambda pid: os.kill(pid, signal.SIGKILL))
        assert tomb.reason == "oom" and "killed" in tomb.detail

        z.report_status = False  # the zygote does not say: the cgroup's OOM count does
        room = await rm.get_or_create(1000, "o2")
        tomb = await _die(world, room, lambda pid: os.kill(pid, signal.SIGKILL))
        assert (tomb.reason, tomb.detail) == ("oom", "the room ran out of memory")

        world.backend.oom_kills = 0
        room = await rm.get_or_create(1000, "u")
        tomb = await _die(world, room, lambda pid: os.kill(pid, signal.SIGKILL))
        assert (tomb.reason, tomb.detail) == ("crashed", "the room init exited (status unknown)")

        room = await rm.get_or_create(1000, "z")
        z.generation += 1  # a new zygote since: the old one took its inits with it
        tomb = await _die(world, room, lambda pid: os.kill(pid, signal.SIGKILL))
        assert tomb.reason == "killed" and "zygote died" in tomb.detail

    run(body)


def test_tombstones_are_bounded_per_uid(world: World) -> None:
    rm = world.rm
    for i in range(40):
        rm._bury((1000, f"r{i}"), rooms.Tombstone("killed", "x", 1, float(i)))
    rm._bury((1001, "other"), rooms.Tombstone("killed", "x", 1, 0.0))
    mine = sorted(k[1] for k in rm.dead if k[0] == 1000)
    cap = max(16, world.cfg.max_rooms_per_uid)
    assert len(mine) == min(40, cap)
    assert (1000, "r39") in rm.dead and (1001, "other") in rm.dead
    if cap < 40:
        assert (1000, "r0") not in rm.dead  # the oldest go first


def test_lost_without_a_tombstone(world: World) -> None:
    async def body() -> None:
        room = await world.rm.get_or_create(1000, "l")
        err = await world.rm.lost(room, OSError("broke"))
        assert err.context["reason"] == "crashed" and "broke" in err.message
        await world.rm.destroy(1000, "l")
        err = await world.rm.lost(room, OSError("broke"))
        assert err.context["reason"] == "destroyed"

    run(body)


# --- shutdown, idle reaping, reconcile ------------------------------------------------------------


def test_shutdown_destroys_every_room_and_refuses_new_ones(world: World) -> None:
    world.backend.leftovers = ["u9-stale"]

    async def body() -> None:
        made = [await world.rm.get_or_create(uid, f"s{uid}") for uid in (1000, 1001, 1002)]
        pids = [r.handle.pid for r in made]
        await world.rm.shutdown()
        assert all(gone(p) for p in pids) and world.rm.rooms == {}
        assert os.listdir(os.path.join(world.state, "rooms")) == []
        assert sorted(world.backend.destroyed) == ["u1000-s1000", "u1001-s1001", "u1002-s1002"]
        with pytest.raises(errors.ShuttingDown):
            await world.rm.get_or_create(1000, "late")

    run(body)


def test_kill_all_kills_every_init(world: World) -> None:
    async def body() -> None:
        made = [await world.rm.get_or_create(1000, f"k{i}") for i in range(2)]
        world.rm.kill_all()
        await until(lambda: all(gone(r.handle.pid) for r in made), "the inits are dead")

    run(body)


def test_idle_rooms_are_reaped_busy_ones_kept() -> None:
    with tempfile.TemporaryDirectory() as d:
        w = World(d, idle_timeout_s=0.2)
        try:
            async def body() -> None:
                # each from a request task of its own, which ends (a room is in use while the
                # task that got it runs)
                idle = await asyncio.ensure_future(w.rm.get_or_create(1000, "idle"))
                busy = await asyncio.ensure_future(w.rm.get_or_create(1000, "busy"))
                busy.active_runs = 1
                w.rm._bury((1000, "old"), rooms.Tombstone("killed", "x", 1, 0.0))
                reaper = asyncio.ensure_future(w.rm.reap_idle())
                await until(lambda: idle.status == "gone" and (1000, "old") not in w.rm.dead,
                            "the idle room and the old tombstone were reaped")
                assert busy.status == "ready" and busy.busy
                assert (1000, "old") not in w.rm.dead  # old tombstones expire too
                assert gone(idle.handle.pid)
                w.rm.closing = True
                reaper.cancel()
                await w.rm.shutdown()

            run(body)
        finally:
            w.zygote.reap_all()


def test_no_idle_reaping_when_the_timeout_is_zero() -> None:
    with tempfile.TemporaryDirectory() as d:
        w = World(d, idle_timeout_s=0)
        assert asyncio.run(w.rm.reap_idle()) is None  # returns at once instead of looping


def test_reconcile_kills_only_the_recorded_init(world: World) -> None:
    base = os.path.join(world.state, "rooms")
    victim = subprocess.Popen(["sleep", "1000"])
    bystander = subprocess.Popen(["sleep", "1000"])
    try:
        start = psutil.Process(victim.pid).create_time()
        for name, meta in (("u1-left", {"initPid": victim.pid, "initStart": start}),
                           # pid reuse: same pid, another start time -> not ours to kill
                           ("u1-reused", {"initPid": bystander.pid, "initStart": start - 100}),
                           ("u1-garbage", None)):
            os.makedirs(os.path.join(base, name, "mnt"))
            if meta is not None:
                with open(os.path.join(base, name, "room.json"), "w") as f:
                    json.dump(meta, f)
        world.backend.leftovers = ["room-u1-left"]
        cleaned = world.rm.reconcile()
        assert cleaned == ["u1-garbage", "u1-left", "u1-reused", "cgroup:room-u1-left"]
        assert gone(victim.pid)  # (reconcile reaped it: psutil waits on its own children)
        assert bystander.poll() is None
        assert os.listdir(base) == []
    finally:
        for p in (victim, bystander):
            p.kill()
            p.wait()


def test_blocking_runs_inline_without_an_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> int:
        loop = asyncio.get_running_loop()

        def refuse(*a: Any) -> Any:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(loop, "run_in_executor", refuse)
        return await rooms._blocking(lambda x: x + 1, 41)

    assert asyncio.run(body()) == 42


def test_room_use_tracks_the_request_task(world: World) -> None:
    async def body() -> None:
        room = rooms.Room("t", 1000, config.RoomOptions(), world.state)
        assert not room.busy
        gate = asyncio.Event()

        async def request() -> None:
            room.use()
            await gate.wait()

        t = asyncio.ensure_future(request())
        await until(lambda: room.busy, "the request counts as a user")
        before = room.last_activity
        gate.set()
        await t
        await until(lambda: not room.busy, "the finished request no longer counts")
        assert room.last_activity >= before
        room.track(asyncio.sleep(0))
        await room.settle()
        assert room.run_cgroup_limits(5, 6) == RunCgroupLimits(
            memory_bytes=5, pids=6)

    run(body)
