"""Background processes against a real daemon (issue 13, "Done means", the process half): they
survive their caller and later execs, their logs read back by offset exactly, a flood keeps only
the ring, streams replay then follow, kill takes the whole tree, limits give exec's verdicts,
rooms and the daemon leave nothing behind, and another tenant reaches none of them."""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProc, make_daemon
from test_tenants import call, tenants  # noqa: F401 - the two-tenant daemon fixture

from sandboxd import errors
from sandboxd.rooms import room_key

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def wait_ended(sb: Any, pid: str, timeout: float = 60) -> Any:
    return sb.process(pid).wait(timeout)


def host_processes(d: DaemonProc, marker: str) -> list[str]:
    return [x for x in d.leftovers(settle=0) if x.startswith("process ") and marker in x]


def wait_for_host(d: DaemonProc, markers: list[str], count: int = 1) -> None:
    """Until each marker shows in ``count`` live room processes on the host."""
    deadline = time.monotonic() + 30
    while True:
        seen = host_processes(d, "")
        if all(sum(m in x for x in seen) >= count for m in markers):
            return
        assert time.monotonic() < deadline, (markers, seen)
        time.sleep(0.05)


# --- lifetime ------------------------------------------------------------------------------------


def test_a_process_survives_its_callers_disconnect_and_later_execs(daemon: DaemonProc,
                                                                  room_id: str) -> None:
    with daemon.client() as first:  # type: ignore[attr-defined]
        proc = first.sandbox(room_id).start_process(
            "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.05; done", process_id="ticker")
        assert proc.record.status == "running" and proc.pid > 0
        assert proc.wait_for_log("tick 2", timeout=30) == "tick 2"
    # The client that started it is gone; others exec (each kills what *it* left) meanwhile.
    with daemon.client() as second:  # type: ignore[attr-defined]
        sb = second.sandbox(room_id)
        for _ in range(3):
            assert sb.exec("sleep 0.01 & echo left-behind").exit_code == 0
        last = int(sb.process_logs("ticker").stdout.split()[-1])
        assert sb.wait_for_log("ticker", f"tick {last + 5}", timeout=30) == f"tick {last + 5}"
        rec = sb.get_process("ticker")
        assert rec.status == "running" and rec.pid == proc.pid
        assert [r.process_id for r in sb.list_processes()] == ["ticker"]
        assert "exitCode" not in rec  # nothing ended yet
        killed = sb.kill_process("ticker")
        assert killed.status == "killed" and killed.verdict in ("SG", "RE")
        assert killed.ended_at and sb.get_process("ticker").status == "killed"
        sb.destroy()


def test_process_ids_exists_and_not_found(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    sb.start_process("sleep", ["60"], process_id="one")
    with pytest.raises(errors.ProcessExists):
        sb.start_process("sleep", ["60"], process_id="one")
    with pytest.raises(errors.ProcessNotFound):
        sb.get_process("two")
    with pytest.raises(errors.InvalidParams):
        sb.start_process("true", process_id="no/slash")
    gen = sb.start_process("true")
    assert gen.id != "one" and wait_ended(sb, gen.id).status == "completed"
    sb.kill_process("one", "KILL")
    # An ended record's id may be used again: the new process replaces it.
    again = sb.start_process("exit 3", process_id="one")
    assert wait_ended(sb, again.id).status == "failed"
    assert sb.get_process("one").exit_code == 3
    missing = sb.start_process("no-such-program-here", [])
    rec = wait_ended(sb, missing.id)
    assert rec.status == "error" and rec.exit_code == 127
    sb.destroy()


# --- logs ----------------------------------------------------------------------------------------


def test_logs_by_offset_never_repeat_or_skip_a_byte(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    n = 40000
    proc = sb.start_process(
        "python3", ["-c", f"import sys, time\nfor i in range({n}):\n"
                          "    sys.stdout.write(f'{i}\\n'); sys.stdout.flush()\n"
                          "    sys.stderr.write('é' if i % 1000 == 0 else '')\n"
                          "    i % 500 or time.sleep(0.002)\n"])
    out, err = bytearray(), bytearray()
    offsets = (0, 0)
    reads = 0
    while True:
        ended = sb.get_process(proc.id).status != "running"
        got = proc.logs(stdout_offset=offsets[0], stderr_offset=offsets[1])
        reads += 1
        assert not got.truncated
        out += got.stdout.encode()
        err += got.stderr.encode()
        assert (got.stdout_offset, got.stderr_offset) == (offsets[0] + len(got.stdout.encode()),
                                                          offsets[1] + len(got.stderr.encode()))
        offsets = (got.stdout_offset, got.stderr_offset)
        if ended and not got.stdout and not got.stderr:
            break
    assert out.decode() == "".join(f"{i}\n" for i in range(n))
    assert err.decode() == "é" * (n // 1000)  # two-byte characters never split between reads
    assert reads >= 2
    sb.destroy()


def test_a_flood_keeps_only_the_ring_and_says_truncated(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    proc = sb.start_process("head -c 10485760 /dev/zero | tr '\\0' a; echo end >&2")
    rec = wait_ended(sb, proc.id)
    assert rec.status == "completed" and rec.output_truncated is False
    got = proc.logs()
    assert got.truncated is True
    assert got.stdout == "a" * MiB and got.stdout_offset == 10 * MiB
    assert got.stderr == "end\n" and got.stderr_offset == 4
    tail = proc.logs(stdout_offset=10 * MiB - 100, stderr_offset=4)
    assert (tail.stdout, tail.stderr, tail.truncated) == ("a" * 100, "", False)
    sb.destroy()


def test_a_stream_replays_then_follows_for_two_streamers_one_leaving(daemon: DaemonProc,
                                                                     room_id: str) -> None:
    with daemon.client() as c:  # type: ignore[attr-defined]
        sb = c.sandbox(room_id)
        proc = sb.start_process(
            "echo first; while [ ! -e /workspace/go ]; do sleep 0.02; done; echo second; "
            "echo third >&2")
        proc.wait_for_log("first", timeout=30)

    results: dict[str, Any] = {}
    seen: dict[str, list[tuple[str, str]]] = {"stays": [], "leaves": []}
    got_first = {name: threading.Event() for name in seen}

    def streamer(name: str) -> None:
        with daemon.client() as mine:  # type: ignore[attr-defined]
            def on_output(stream: str, data: str) -> None:
                seen[name].append((stream, data))
                got_first[name].set()
                if name == "leaves":
                    raise ConnectionAbortedError("this client goes away mid-stream")
            try:
                results[name] = mine.sandbox(room_id).stream_process_logs(proc.id, on_output)
            except ConnectionAbortedError:
                results[name] = "left"

    threads = [threading.Thread(target=streamer, args=(n,), daemon=True) for n in seen]
    for t in threads:
        t.start()
    for ev in got_first.values():
        assert ev.wait(30)
    threads[1].join(30)
    assert results["leaves"] == "left"
    with daemon.client() as c:  # type: ignore[attr-defined]
        c.sandbox(room_id).write_file("/workspace/go", "")
        threads[0].join(60)
        final = results["stays"]
        assert final.status == "completed" and final.exit_code == 0
        text = {s: "".join(d for st, d in seen["stays"] if st == s) for s in ("stdout", "stderr")}
        assert text == {"stdout": "first\nsecond\n", "stderr": "third\n"}
        assert seen["leaves"] == [("stdout", "first\n")]  # the replay, then it left
        # Resuming from an offset replays only what came after it.
        again: list[str] = []
        c.sandbox(room_id).stream_process_logs(proc.id, lambda s, d: again.append(d),
                                               stdout_offset=len("first\n"), stderr_offset=6)
        assert again == ["second\n"]
        c.sandbox(room_id).destroy()


def test_a_streamer_that_stops_reading_never_stalls_the_process(daemon: DaemonProc,
                                                                room_id: str) -> None:
    """The rings are filled by the daemon whatever its streamers do: a client that reads
    nothing while the process floods does not slow it; later it skips what was dropped."""
    with daemon.client() as c:  # type: ignore[attr-defined]
        sb = c.sandbox(room_id)
        proc = sb.start_process("echo start; sleep 0.2; head -c 20971520 /dev/zero | tr '\\0' b")
        proc.wait_for_log("start", timeout=30)
    ended = threading.Event()
    got = {"bytes": 0}
    final: dict[str, Any] = {}

    def slow_streamer() -> None:
        with daemon.client() as mine:  # type: ignore[attr-defined]
            def on_output(stream: str, data: str) -> None:
                if not got["bytes"]:
                    ended.wait(60)  # stop reading until the flood is over
                got["bytes"] += len(data)
            final["rec"] = mine.sandbox(room_id).stream_process_logs(proc.id, on_output)

    t = threading.Thread(target=slow_streamer, daemon=True)
    t.start()
    with daemon.client() as c:  # type: ignore[attr-defined]
        rec = wait_ended(c.sandbox(room_id), proc.id)
        assert rec.status == "completed"
        ended.set()
        t.join(60)
        assert final["rec"].status == "completed"
        # It got what the ring still held when it read on, not the 20 MiB.
        assert len("start\n") < got["bytes"] < 20 * MiB
        c.sandbox(room_id).destroy()


def test_wait_for_log_finds_buffered_and_new_lines(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    proc = sb.start_process("echo ready on port 8000; sleep 0.3; echo 'later: 42 items' >&2; "
                            "sleep 60")
    assert proc.wait_for_log("port 8000", timeout=30) == "ready on port 8000"
    assert proc.wait_for_log(r"later: \d+", regex=True, timeout=30) == "later: 42 items"
    with pytest.raises(errors.ProcessReadyTimeout):
        proc.wait_for_log("never printed", timeout=0.3)
    proc.kill("KILL")
    quick = sb.start_process("echo bye; exit 4")
    with pytest.raises(errors.ProcessExitedBeforeReady) as info:
        quick.wait_for_log("hello", timeout=30)
    assert info.value.context["exitCode"] == 4
    sb.destroy()


# --- killing -------------------------------------------------------------------------------------


def test_kill_takes_a_setsid_double_forked_stopped_tree(daemon: DaemonProc, room_id: str) -> None:
    tag = f"{secrets.randbelow(10**6) + 10**6}"
    with daemon.client() as c:  # type: ignore[attr-defined]
        sb = c.sandbox(room_id)
        # The main process ignores SIGTERM, one child is in a session of its own, one is
        # double-forked (reparented to the room's init), one stopped itself.
        proc = sb.start_process(
            f"trap '' TERM; setsid sleep {tag}1 & (sleep {tag}2 &); "
            f"sh -c 'kill -STOP $$; exec sleep {tag}3' & sleep {tag}4 & echo up; wait")
        proc.wait_for_log("up", timeout=30)
        wait_for_host(daemon, [f"sleep {tag}{k}" for k in range(1, 5)])
        rec = proc.kill()  # SIGTERM, then SIGKILL for what is left 2 s later
        assert rec.status == "killed"
        assert host_processes(daemon, tag) == []
        assert sb.exec("true").exit_code == 0  # the room goes on
        # A process that does stop on SIGTERM ends by it, with its handler run.
        polite = sb.start_process("trap 'echo bye; exit 0' TERM; echo up; "
                                  "while :; do sleep 0.05; done")
        polite.wait_for_log("up", timeout=30)
        done = polite.kill(signal.SIGTERM)
        assert done.status == "killed" and "bye" in polite.logs().stdout
        sb.destroy()


def test_kill_all_processes(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    for i in range(3):
        sb.start_process("sleep", ["300"], process_id=f"s{i}")
    assert sb.kill_all_processes() == 3
    assert {r.status for r in sb.list_processes()} == {"killed"}
    assert sb.kill_all_processes() == 0
    sb.destroy()


def test_live_processes_per_room_are_a_quota(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    for i in range(16):  # max_processes_per_room's default
        sb.start_process("sleep", ["300"], process_id=f"q{i}")
    with pytest.raises(errors.QuotaExceeded):
        sb.start_process("sleep", ["300"])
    sb.kill_process("q0", "KILL")
    sb.start_process("true")  # one slot free again
    sb.destroy()


# --- limits: exec's verdicts ---------------------------------------------------------------------


@pytest.mark.parametrize(("command", "limits"), [
    ("sleep 30", {"wallTimeMs": 300}),
    ("while :; do :; done", {"cpuTimeMs": 200}),
    ("yes", {"outputBytes": 10000}),
    ("exit 7", {"wallTimeMs": 30000}),
    ("kill -SEGV $$", {}),
], ids=["wall", "cpu", "output", "exit", "signal"])
def test_limits_give_the_same_verdicts_as_exec(client: Any, room_id: str, command: str,
                                               limits: dict[str, int]) -> None:
    sb = client.sandbox(room_id)
    ran = sb.exec(command, limits=limits or None)
    rec = wait_ended(sb, sb.start_process(command, limits=limits or None).id)
    assert (rec.verdict, rec.limit_exceeded, rec.timed_out, rec.output_truncated) == (
        ran.status, ran.limit_exceeded, ran.timed_out, ran.output_truncated)
    if ran.status != "OL":  # (an output kill races the program's own EPIPE: 137 or 141)
        assert (rec.exit_code, rec.signal) == (ran.exit_code, ran.signal)
    assert rec.status == {"TO": "killed", "OL": "killed", "RE": "failed", "SG": "failed"}[
        ran.status]
    assert rec.cpu_time_ms is not None and rec.wall_time_ms is not None
    sb.destroy()


def test_a_memory_limit_gives_ml_as_exec(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    hog = "python3 -c 'b = []\nwhile True: b.append(bytearray(1 << 20))'"
    lim = {"memoryBytes": 64 * MiB}
    ran = sb.exec(hog, limits=lim)  # (LIMIT_UNAVAILABLE on a host that cannot enforce it)
    rec = wait_ended(sb, sb.start_process(hog, limits=lim).id)
    assert (rec.verdict, rec.limit_exceeded, rec.oom_killed, rec.status) == (
        ran.status, ran.limit_exceeded, ran.oom_killed, "killed")
    assert ran.status == "ML"
    sb.destroy()


# --- nothing left behind -------------------------------------------------------------------------


def test_destroy_and_shutdown_leave_no_process_or_cgroup(fresh_daemon: DaemonProc) -> None:
    d = fresh_daemon
    d.start()
    tag = f"{secrets.randbelow(10**6) + 10**6}"
    with d.client() as c:  # type: ignore[attr-defined]
        for room in ("gone", "stays"):
            p = c.sandbox(room).start_process(
                f"setsid sleep {tag}1 & (sleep {tag}2 &); echo up; sleep {tag}3")
            p.wait_for_log("up", timeout=30)
        wait_for_host(d, [f"sleep {tag}{k}" for k in range(1, 4)], count=2)
        c.sandbox("gone").destroy()
        assert not [x for x in d.leftovers(settle=0) if "-gone" in x]
        mine = host_processes(d, tag)
        assert len(mine) >= 3 and all("-stays]" in x for x in mine), mine
    assert d.stop() == 0
    assert d.leftovers() == []


def test_a_room_whose_init_dies_takes_its_processes(daemon: DaemonProc, room_id: str) -> None:
    tag = f"{secrets.randbelow(10**6) + 10**6}"
    with daemon.client() as c:  # type: ignore[attr-defined]
        sb = c.sandbox(room_id)
        sb.start_process(f"setsid sleep {tag}1 & echo up; sleep {tag}2").wait_for_log(
            "up", timeout=30)
        wait_for_host(daemon, [f"sleep {tag}1", f"sleep {tag}2"])
        meta = json.loads(Path(daemon.state_dir, "rooms", room_key(os.getuid(), room_id),
                               "room.json").read_text())
        os.kill(int(meta["initPid"]), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            try:
                sb.get_process("nothing")
            except errors.SandboxUnavailable:
                break  # the room is a tombstone now
            except errors.ProcessNotFound:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert host_processes(daemon, tag) == []
        assert not [x for x in daemon.leftovers() if room_id[:20] in x]
        sb.destroy()


# --- a configured daemon: the idle reaper, the record and log caps --------------------------------


def test_the_idle_reaper_spares_a_room_with_a_live_process_and_records_are_capped(
        test_user: Any) -> None:
    d = make_daemon(test_user)
    cfg = os.path.join(os.path.dirname(d.state_dir), "sandboxd.toml")
    settings = {"idle_timeout_s": 2.0, "process_log_bytes": 1024,
                "max_process_log_bytes_per_room": 4200, "max_ended_processes_per_room": 2}
    with open(cfg, "w") as f:
        f.write("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    os.chmod(cfg, 0o644)
    d.extra_args += ["--config", cfg]
    d.start()
    try:
        with d.client() as c:  # type: ignore[attr-defined]
            sb = c.sandbox("busy")
            sb.start_process("sleep", ["300"], process_id="server")
            c.sandbox("idle").exec("true")
            # The idle room goes (the reaper ran past its timeout); the busy one, older in
            # activity but with a live process, stays, its process still running.
            deadline = time.monotonic() + 60
            while "idle" in {s.sandbox_id for s in c.list_sandboxes()}:
                assert time.monotonic() < deadline, "the idle reaper never ran"
                time.sleep(0.2)
            assert sb.get_process("server").status == "running"
            # Two live processes reserve 2 x 2 x 1024 bytes: a third does not fit in 4200.
            sb.start_process("sleep", ["300"], process_id="second")
            with pytest.raises(errors.QuotaExceeded) as info:
                sb.start_process("true")
            assert info.value.context["scope"] == "logBytes"
            sb.kill_process("second", "KILL")
            for i in range(3):
                wait_ended(sb, sb.start_process(f"echo {i}", process_id=f"e{i}").id)
            # Ended records: at most two kept, the oldest dropped first.
            assert [r.process_id for r in sb.list_processes()] == ["server", "e1", "e2"]
            assert sb.process_logs("e2").stdout == "2\n"
        assert d.stop() == 0
        assert d.leftovers() == []
    finally:
        if d.proc is not None:
            d.stop(signal.SIGKILL)


# --- tenants -------------------------------------------------------------------------------------


def test_another_tenant_cannot_see_read_or_kill_a_process(tenants: Any) -> None:  # noqa: F811
    d, a, b = tenants
    room = f"p{secrets.token_hex(4)}"
    started = call(a, d, "startProcess", {"sandboxId": room, "command": "sleep 300",
                                          "processId": "secret"})
    assert started["status"] == "running"
    for method, extra in (("getProcess", {}), ("getProcessLogs", {}), ("killProcess", {}),
                          ("waitForLog", {"pattern": "x", "timeout": 100}),
                          ("streamProcessLogs", {})):
        got = call(b, d, method, {"sandboxId": room, "processId": "secret", **extra})
        assert got == {"error": "PROCESS_NOT_FOUND"}, method
    assert call(b, d, "listProcesses", {"sandboxId": room}) == {"processes": []}
    assert call(b, d, "killAllProcesses", {"sandboxId": room}) == {"killed": 0}
    assert call(a, d, "getProcess", {"sandboxId": room, "processId": "secret"})[
        "status"] == "running"
    call(a, d, "destroy", {"sandboxId": room})
    call(b, d, "destroy", {"sandboxId": room})
