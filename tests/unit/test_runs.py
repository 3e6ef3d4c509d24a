"""The verdict of a run and the memory limit of its cgroup: pure functions, no daemon."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from sandboxd import runs
from sandboxd.jail import messages
from sandboxd.jail.cgroup.interface import CgroupStats

MiB = 1024 * 1024


def _exited(code: int) -> int:
    return code << 8


def _signalled(sig: int) -> int:
    return int(sig)


OUT = runs.Output(b"out")


def _verdict(status: int, killed: str | None = None, oom: bool = False, *,
             out: runs.Output = OUT, stats: CgroupStats | None = None,
             failure: dict[str, Any] | None = None, **kw: Any) -> runs.RunResult:
    msg = messages.Exit(run="1", status=status,
                        rusage=messages.Rusage(utime=0.25, stime=0.05, maxrss_kb=2048),
                        failure=None if failure is None else messages.Failure(**failure))
    st = stats if stats is not None else CgroupStats(
        cpu_usage_ns=512_000_000, memory_peak_bytes=10 * MiB, pids_current=0, pids_peak=3)
    return runs.verdict(msg, killed, oom, out, runs.Output(b"err"), 700, st, **kw)


def test_exit_zero_is_ok_with_cgroup_figures() -> None:
    r = _verdict(_exited(0))
    assert (r.status, r.exit_code, r.signal, r.timed_out, r.oom_killed) == ("OK", 0, None,
                                                                            False, False)
    assert (r.cpu_time_ms, r.memory_peak_bytes, r.pids_peak, r.wall_time_ms) == (512, 10 * MiB,
                                                                                  3, 700)
    assert (r.stdout, r.stderr) == ("out", "err")


def test_nonzero_exit_is_re() -> None:
    r = _verdict(_exited(3))
    assert (r.status, r.exit_code, r.limit_exceeded) == ("RE", 3, None)


def test_signal_not_from_us_is_sg_with_name() -> None:
    r = _verdict(_signalled(signal.SIGSEGV))
    assert (r.status, r.signal, r.exit_code) == ("SG", "SIGSEGV", 128 + signal.SIGSEGV)


@pytest.mark.parametrize("reason", ["wall", "cpu"])
def test_our_time_kill_is_to_whatever_the_signal(reason: str) -> None:
    r = _verdict(_signalled(signal.SIGKILL), reason)
    assert (r.status, r.timed_out, r.limit_exceeded, r.exit_code) == ("TO", True, reason, 124)
    assert r.signal == "SIGKILL"


def test_time_kill_beats_an_oom_seen_on_the_way() -> None:
    assert _verdict(_signalled(signal.SIGKILL), "wall", oom=True).status == "TO"


def test_oom_is_ml_even_when_a_shell_reports_137() -> None:
    # sh -c 'hog' exits 137 after its child was OOM-killed: the cgroup's counter decides, not 137.
    r = _verdict(_exited(137), oom=True)
    assert (r.status, r.oom_killed, r.limit_exceeded) == ("ML", True, "memory")


def test_exit_137_without_oom_is_re_not_ml() -> None:
    assert _verdict(_exited(137)).status == "RE"


def test_sigkill_without_oom_or_our_kill_is_sg() -> None:
    assert _verdict(_signalled(signal.SIGKILL)).status == "SG"


def test_output_kill_is_ol_and_keeps_the_capped_output() -> None:
    r = _verdict(_signalled(signal.SIGKILL), "output", out=runs.Output(b"y\n" * 8, True))
    assert (r.status, r.output_truncated, r.limit_exceeded) == ("OL", True, "output")
    assert r.stdout == "y\n" * 8 and r.stdout_bytes == b"y\n" * 8


def test_sigxfsz_under_a_file_size_limit_names_the_limit() -> None:
    r = _verdict(_signalled(signal.SIGXFSZ), file_size_limited=True)
    assert (r.status, r.signal, r.limit_exceeded) == ("SG", "SIGXFSZ", "fileSize")
    assert _verdict(_signalled(signal.SIGXFSZ)).limit_exceeded is None


def test_setup_failure_is_xx_but_exec_failure_is_the_programs() -> None:
    r = _verdict(_exited(1), failure={"stage": "cgroup", "errno": 13})
    assert r.status == "XX" and r.error and "cgroup" in r.error
    assert _verdict(_exited(127), failure={"stage": "exec", "errno": 2}).status == "RE"
    assert _verdict(_exited(1), failure={"stage": "chdir", "errno": 2}).status == "RE"


def test_xx_beats_our_kills() -> None:
    assert _verdict(_exited(1), "wall", failure={"stage": "rlimits", "errno": 22}).status == "XX"


def test_without_cgroup_figures_rusage_is_used() -> None:
    r = _verdict(_exited(0), stats=CgroupStats())
    assert r.cpu_time_ms == 300
    # ru_maxrss would be the init's pre-exec image, not the program's: no figure instead.
    assert r.memory_peak_bytes is None and r.pids_peak is None


def test_invalid_utf8_is_replaced_but_bytes_kept() -> None:
    r = _verdict(_exited(0), out=runs.Output(b"ok \xff"))
    assert r.stdout == "ok \ufffd" and r.stdout_bytes == b"ok \xff"


def test_report_has_every_wire_field() -> None:
    rep = _verdict(_signalled(signal.SIGKILL), "cpu").report()
    assert set(rep) >= {"status", "exitCode", "signal", "timedOut", "limitExceeded", "oomKilled",
                        "outputTruncated", "cpuTimeMs", "wallTimeMs", "memoryPeakBytes",
                        "pidsPeak"}
    assert "error" not in rep


@pytest.mark.parametrize(("requested", "room", "enforced", "expected"), [
    (None, 512 * MiB, {"memory"}, 512 * MiB),        # no request: the room's (the init is not
    (64 * MiB, 512 * MiB, {"memory"}, 64 * MiB),     # under it); a request below is kept
    (512 * MiB, 512 * MiB, {"memory"}, 512 * MiB),   # the room's own figure
    (1024 * MiB, 512 * MiB, {"memory"}, 512 * MiB),  # never above the room's
    (None, 512 * MiB, set(), None),                  # no memory controller: nothing to write
    (64 * MiB, 512 * MiB, {"pids"}, 64 * MiB),
])
def test_run_memory_limit(requested: int | None, room: int, enforced: set[str],
                          expected: int | None) -> None:
    assert runs.run_memory_limit(requested, room, enforced) == expected


def test_refused_forks_name_the_pids_limit_without_changing_the_status() -> None:
    hit = CgroupStats(cpu_usage_ns=1, pids_current=0, pids_peak=8, pids_limit_hits=3)
    r = _verdict(_exited(2), stats=hit)
    assert (r.status, r.exit_code, r.limit_exceeded) == ("RE", 2, "pids")
    r = _verdict(_exited(0), stats=hit)
    assert (r.status, r.limit_exceeded) == ("OK", "pids")
    # A limit that ended the run is the one reported.
    r = _verdict(_signalled(9), "wall", stats=hit)
    assert (r.status, r.limit_exceeded) == ("TO", "wall")


class _RoomCg:
    def __init__(self, enforced: set[str], current: int | None) -> None:
        self.enforced = frozenset(enforced)
        self.current = current

    def runs_stats(self) -> CgroupStats:
        return CgroupStats(memory_current_bytes=self.current)


class _Room:
    def __init__(self, enforced: set[str], current: int | None, active: int = 1) -> None:
        from types import SimpleNamespace

        self.cgroup = _RoomCg(enforced, current)
        self.active_runs = active
        self.options = SimpleNamespace(limits=SimpleNamespace(memory_bytes=128 * MiB))


@pytest.mark.parametrize(("enforced", "current", "active", "expected"), [
    ({"memory"}, 10 * MiB, 1, True),                    # room to spare, the only run
    ({"memory"}, 128 * MiB - runs.SPAWN_HEADROOM_BYTES + 1, 1, False),  # nearly full (L4)
    ({"memory"}, 10 * MiB, 2, False),                   # another live run may fill it meanwhile
    ({"memory"}, None, 1, False),                       # no figure: do not guess
    (set(), None, 3, True),                             # no memory limit: nothing to fear
])
def test_init_stands_in_a_run_cgroup_only_when_no_oom_can_reach_it(
        enforced: set[str], current: int | None, active: int, expected: bool) -> None:
    room: Any = _Room(enforced, current, active)
    assert runs.init_may_stand_in(room) is expected
