"""Background processes without a daemon: the log ring's offsets, UTF-8 boundaries, the record
table's caps, signal names, and the pidfd-checked signalling of a cgroup's members."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sandboxd import errors, processes
from sandboxd.jail.cgroup.fs import Fs
from sandboxd.processes import LogRing, ProcessRecord, ProcessTable, complete_utf8
from sandboxd.runs import RunResult


def run(coro: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro())  # type: ignore[arg-type]


def test_the_ring_keeps_the_newest_bytes_at_absolute_offsets() -> None:
    ring = LogRing(10)
    ring.append(b"0123456789")
    assert ring.read(0) == (b"0123456789", 10, False)
    ring.append(b"abcde")
    assert (ring.start, ring.end) == (5, 15)
    assert ring.read(0) == (b"56789abcde", 15, True)  # 0..4 were dropped
    assert ring.read(5) == (b"56789abcde", 15, False)
    assert ring.read(12) == (b"cde", 15, False)
    assert ring.read(15) == (b"", 15, False)
    assert ring.read(99) == (b"", 15, False)  # past the end: stays where the stream is
    assert ring.read(7, limit=2) == (b"78", 9, False)
    ring.append(b"x" * 25)  # one write larger than the ring
    assert ring.read(0) == (b"x" * 10, 40, True)


def test_reads_in_small_pieces_rebuild_the_stream() -> None:
    ring = LogRing(1 << 16)
    stream = b"".join(f"{i}\n".encode() for i in range(5000))
    got, pos = bytearray(), 0
    for i in range(0, len(stream), 333):
        ring.append(stream[i:i + 333])
        data, pos, cut = ring.read(pos, limit=100)
        assert not cut
        got += data
    while data := ring.read(pos)[0]:
        got += data
        pos += len(data)
    assert bytes(got) == stream


@pytest.mark.parametrize(("data", "keep"), [
    (b"", 0), (b"abc", 3), ("é".encode(), 2), ("é".encode()[:1], 0),
    (b"a" + "€".encode()[:2], 1), (b"a" + "€".encode(), 4), ("😀".encode()[:3], 0),
    (b"x" + "😀".encode(), 5), (b"\xff", 1), (b"\x80\x80", 2),
])
def test_complete_utf8_never_cuts_a_character(data: bytes, keep: int) -> None:
    assert complete_utf8(data) == keep


def test_read_logs_holds_back_half_a_character_while_the_process_runs() -> None:
    async def body() -> None:
        rec = ProcessRecord("p", "cmd", 1024)
        rec.on_data("stdout", "aé".encode()[:2])
        got = processes.read_logs(rec, {"stdout": 0})
        assert (got.stdout, got.stdout_offset) == ("a", 1)
        rec.on_data("stdout", "é".encode()[1:])
        got = processes.read_logs(rec, {"stdout": got.stdout_offset})
        assert (got.stdout, got.stdout_offset, got.truncated) == ("é", 3, False)
    run(body)


def _ended(table: ProcessTable, pid: str, held: int = 0) -> ProcessRecord:
    rec = ProcessRecord(pid, "x", 100)
    rec.rings["stdout"].append(b"o" * held)
    rec.end("completed", RunResult(exit_code=0, status="OK", stdout="", stderr="",
                                   wall_time_ms=1, cpu_time_ms=0, memory_peak_bytes=None,
                                   pids_peak=None))
    table.records[pid] = rec
    return rec


def test_ended_records_and_log_bytes_drop_the_oldest_first() -> None:
    async def body() -> None:
        table = ProcessTable()
        for i in range(5):
            _ended(table, f"e{i}", held=50)
        live = ProcessRecord("live", "x", 100)
        table.records["live"] = live
        assert live.reserved_bytes() == 200 and table.records["e0"].reserved_bytes() == 50
        table.trim(3)
        assert list(table.records) == ["e2", "e3", "e4", "live"]
        # 3 x 50 held + 200 reserved = 350; another live process needs 200 of a 450 budget.
        assert table.make_room_for(200, 450)
        assert list(table.records) == ["e4", "live"]
        assert not table.make_room_for(300, 450)  # the live ones alone leave too little
        assert list(table.records) == ["live"]
        assert table.new_id() == "proc-1"
        info = table.records["live"].info()
        assert info.status == "running" and "endedAt" not in info
    run(body)


def test_a_record_says_how_it_ended() -> None:
    async def body() -> None:
        table = ProcessTable()
        rec = _ended(table, "done")
        info = rec.info()
        assert (info.status, info.exit_code, info.verdict) == ("completed", 0, "OK")
        assert info.ended_at and "error" not in info
        room: Any = types.SimpleNamespace(processes=table, id="r")
        with pytest.raises(errors.ProcessNotFound):
            processes.lookup(room, "nope")
        with pytest.raises(errors.ProcessNotFound):
            await processes.process_ended(room, "nope")
        assert await processes.process_ended(room, "done") is rec
        table.records["up"] = ProcessRecord("up", "x", 100)
        assert await processes.process_ended(room, "up") is None
    run(body)


@pytest.mark.parametrize(("given", "num"), [
    (None, signal.SIGTERM), ("TERM", signal.SIGTERM), ("sigkill", signal.SIGKILL),
    ("SIGINT", signal.SIGINT), (9, 9), (1, 1)])
def test_signal_names_and_numbers(given: int | str | None, num: int) -> None:
    assert processes.signal_number(given) == num


@pytest.mark.parametrize("bad", ["SIGNOPE", "", 0, 65])
def test_unknown_signals_are_refused(bad: int | str) -> None:
    with pytest.raises(errors.ValidationError):
        processes.signal_number(bad)


def test_signal_members_signals_only_who_is_still_a_member() -> None:
    """The real Fs: a pid read from cgroup.procs is signalled through a pidfd, and only if the
    second read still lists it (a pid reused elsewhere meanwhile is left alone)."""
    kept = subprocess.Popen(["sleep", "60"])
    left = subprocess.Popen(["sleep", "60"])
    reads = iter([{kept.pid, left.pid}, {kept.pid}])
    try:
        assert Fs().signal_members(lambda: next(reads), signal.SIGTERM) == 1
        assert kept.wait(10) == -signal.SIGTERM
        time.sleep(0.05)
        assert left.poll() is None
        # A stopped member gets SIGCONT after the signal, so it acts on it.
        os.kill(left.pid, signal.SIGSTOP)
        assert Fs().signal_members(lambda: {left.pid}, signal.SIGTERM) == 1
        assert left.wait(10) == -signal.SIGTERM
    finally:
        for p in (kept, left):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_uids_log_bytes_drop_its_oldest_ended_records_across_rooms() -> None:
    async def body() -> None:
        a, b = ProcessTable(), ProcessTable()
        old = _ended(a, "old", held=60)
        newer = _ended(b, "newer", held=60)
        old.ended_at, newer.ended_at = 1.0, 2.0
        a.records["live"] = ProcessRecord("live", "x", 100)  # reserves 200
        assert processes.make_room_across([a, b], 200, 480)  # 320 + 200 > 480: "old" goes
        assert (list(a.records), list(b.records)) == (["live"], ["newer"])
        assert not processes.make_room_across([a, b], 300, 480)
        assert list(b.records) == []
    run(body)


def test_the_record_takes_its_pid_from_the_spawn_even_without_its_starter() -> None:
    """Regression: the pid was set by the startProcess request after its wait; a caller that
    went away during the spawn left the record of a live process with pid 0."""
    async def body() -> None:
        rec = ProcessRecord("p", "cmd", 1024)
        rec.control.spawned.set_result(42)
        await asyncio.sleep(0)  # (done callbacks run on the next loop turn)
        assert rec.pid == 42 and rec.info().pid == 42
    run(body)


@pytest.mark.parametrize("pattern", [
    r"later: \d+", r"^Serving HTTP on .* port (\d+)", r"(foo|bar) ready", r"a{2}b", r"(ab)+c",
    r"(?=x)y", r"(a|b)+", r"(?i)listening"])
def test_ordinary_regexes_are_accepted(pattern: str) -> None:
    assert processes.safe_regex(pattern).pattern == pattern


@pytest.mark.parametrize("pattern", [
    r"(a+)+$", r"(a*)*", r"(a|aa)*", r"((ab)+)+", r"(x+x+)+y", r"(\w)\1", "(?P<n>a)(?P=n)",
    r"(?:(?:a+))+", "[unclosed"])
def test_regexes_that_backtrack_without_end_are_refused(pattern: str) -> None:
    """waitForLog searches in the daemon's event loop, where ``re`` cannot be interrupted: a
    tenant's ``(a+)+$`` on a line of a's would stall every room of every tenant."""
    with pytest.raises(errors.ValidationError):
        processes.safe_regex(pattern)
