"""Room and run limits against a real daemon (issue 4): verdicts, figures, whole-tree kills.

Every test ends with a host-side check (``host_ok``): the room still answers, nothing of the run
is left on the host (no descendant of a room init, no process of the test user outside a
daemon's tree), and, where it applies, the host's cgroups and filesystem hold what we expect.
The v1 backend is this machine's default; the v2 backend is driven on the hybrid cgroup2 mount
(no controllers there: kills, CPU time and joins only), the disabled backend by a config file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    CGROUP_V1,
    SANDBOXCTL,
    SANDBOXD,
    DaemonProc,
    as_user,
    make_daemon,
    skip_unless_ci,
)

from sandboxd import errors
from sandboxd.client import Client
from sandboxd.rooms import room_key

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
V2_ROOT = "/sys/fs/cgroup/unified"

# --- host-side checks ----------------------------------------------------------------------------


def _daemon_pids(daemon: DaemonProc) -> tuple[int, set[int]]:
    """(the daemon's pid, the pids of its room inits)."""
    assert daemon.proc is not None
    setpriv = psutil.Process(daemon.proc.pid)
    # as_user runs setpriv -> env -> sandboxd, each exec'ing the next: one pid.
    inits: set[int] = set()
    for child in setpriv.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if " ".join(child.cmdline()).startswith("sandboxd: room"):
                inits.add(child.pid)
    return setpriv.pid, inits


def strays(daemon: DaemonProc) -> list[str]:
    """Payload processes left in any room, and test-user processes outside every daemon."""
    _, inits = _daemon_pids(daemon)
    found = []
    for pid in inits:
        with contextlib.suppress(psutil.Error):
            found += [f"{p.pid} in a room: {' '.join(p.cmdline())[:60]}"
                      for p in psutil.Process(pid).children(recursive=True)]
    for p in psutil.process_iter(["uids", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.info["uids"].real != daemon.user.pw_uid:
                continue
            chain = [p, *p.parents()]
            if not any("sandboxd" in " ".join(a.cmdline()) and "--state-dir" in a.cmdline()
                       for a in chain):
                found.append(f"{p.pid} outside any daemon: {' '.join(p.info['cmdline'])[:60]}")
    return found


def host_ok(daemon: DaemonProc, sb: Any) -> None:
    """The room answers and the host holds nothing of the finished run."""
    r = sb.exec("true")
    assert r.status == "OK", r.raw
    deadline = time.monotonic() + 3.0
    # Run cgroups are removed after the reply (not on the caller's time): poll a little.
    while (left := strays(daemon) + run_cgroups(daemon)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, left


def _base(daemon: DaemonProc, ctl: str) -> Path:
    """Where the daemon's room cgroups live for controller ``ctl``: its v1 instance directory
    in that controller's hierarchy, or on v2 (the VM tier) its one delegated cgroup."""
    if daemon.cgroup_backend == "v2":
        return Path(daemon.room_cgroup_dirs[0])
    return Path(CGROUP_V1, ctl, "sandboxd", daemon.user.pw_name, daemon.instance)


#: v1 file name -> its v2 counterpart, for the files these tests read
V2_FILE = {"memory.limit_in_bytes": "memory.max", "pids.max": "pids.max"}


def cg_file(daemon: DaemonProc, v1_name: str) -> str:
    return V2_FILE[v1_name] if daemon.cgroup_backend == "v2" else v1_name


def run_cgroups(daemon: DaemonProc) -> list[str]:
    """Run cgroups still on the host, in any room of the daemon's instance."""
    return sorted({str(p) for ctl in ("memory", "pids", "freezer")
                   for p in _base(daemon, ctl).glob("room-*/runs/run-*")})


def room_cgroup(daemon: DaemonProc, ctl: str, room: str) -> Path:
    return _base(daemon, ctl) / f"room-{room_key(0, room)}"


def init_pid(daemon: DaemonProc, room: str) -> int:
    procs = (room_cgroup(daemon, "pids", room) / "init" / "cgroup.procs").read_text().split()
    return min(int(p) for p in procs)


# --- verdicts ------------------------------------------------------------------------------------


def test_exit_3_is_re(client: Any, daemon: DaemonProc, room_id: str) -> None:
    sb = client.sandbox(room_id)
    r = sb.exec("exit 3")
    assert (r.status, r.exit_code, r.raw["signal"], r.raw["timedOut"]) == ("RE", 3, None, False)
    host_ok(daemon, sb)


def test_kill_segv_self_is_sg_with_the_signal_name(client: Any, daemon: DaemonProc,
                                                   room_id: str) -> None:
    sb = client.sandbox(room_id)
    r = sb.exec("kill -SEGV $$")
    assert (r.status, r.raw["signal"], r.exit_code) == ("SG", "SIGSEGV", 128 + 11)
    host_ok(daemon, sb)


HOGS = {
    "python": ("", "python3 -c 'a=[]\nwhile True: a.append(bytearray(1 << 20))'"),
    "c": ("printf '%s' '#include <stdlib.h>\n#include <string.h>\n"
          "int main(void){for(;;){char*p=malloc(1<<20);if(!p)return 2;memset(p,1,1<<20);}}' "
          "| gcc -x c -O0 -o /tmp/hog -", "/tmp/hog"),
    # Node (like the JVM and Go) dies at start-up under RLIMIT_AS (nsjail #76); a cgroup limit
    # lets it run until it really uses the memory.
    "node": ("", "node -e 'const a=[]; for(;;) a.push(Buffer.alloc(1<<20, 1))'"),
}


@pytest.mark.parametrize("lang", sorted(HOGS))
def test_memory_hog_is_ml(client: Any, daemon: DaemonProc, room_id: str, lang: str) -> None:
    sb = client.sandbox(room_id)
    build, run = HOGS[lang]
    tool = run.split()[0]
    if not tool.startswith("/") and sb.exec(f"command -v {tool}").exit_code != 0:
        skip_unless_ci(f"{tool} is not in this room's rootfs ({daemon.rootfs})")
    if build:
        assert sb.exec(build).status == "OK"
    limit = 128 * MiB
    # A generous wall limit: near the limit, v1 reclaims the program's own code pages and can
    # thrash for seconds before it gives up and OOM-kills (node's 100 MB binary: 1-7 s).
    r = sb.exec(run, limits={"memoryBytes": limit, "wallTimeMs": 30_000})
    assert (r.status, r.raw["oomKilled"], r.raw["limitExceeded"]) == ("ML", True, "memory"), r.raw
    # The limit is a cgroup limit, not RLIMIT_AS: the hog got close to it before the kill.
    assert limit * 0.5 < r.memory_peak_bytes <= limit
    host_ok(daemon, sb)


def test_argv_form_memory_hog_killed_by_the_kernel_is_ml(client: Any, daemon: DaemonProc,
                                                          room_id: str) -> None:
    # V01: no shell in between, so the OOM killer's SIGKILL reaches the run's main process
    # itself: the verdict is ML (the kernel's kill for the memory limit), never SG.
    sb = client.sandbox(room_id)
    limit = 64 * MiB
    r = sb.exec("python3", ["-c", "a=[]\nwhile True: a.append(bytearray(1 << 20))"],
                limits={"memoryBytes": limit, "wallTimeMs": 30_000})
    assert (r.status, r.raw["oomKilled"], r.raw["limitExceeded"]) == ("ML", True, "memory"), r.raw
    assert (r.exit_code, r.raw["signal"]) == (137, "SIGKILL"), r.raw
    host_ok(daemon, sb)


def test_room_level_oom_does_not_kill_the_init(client: Any, daemon: DaemonProc,
                                               room_id: str) -> None:
    # Regression: 8 small processes of 20 MiB in a 128 MiB room with no run limit made a
    # room-level OOM whose biggest task was the init (~30 MiB RSS): the room died. The room's
    # limit is now its runs' cgroup's, which the init is not in (issue 10, L4), and each run gets
    # the room's limit, so the OOM stays inside the run's cgroup.
    sb = client.sandbox(room_id)
    sb.get({"limits": {"memoryBytes": 128 * MiB}})
    init = init_pid(daemon, room_id)
    run_limit: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 30
        while not run_limit and time.monotonic() < deadline:
            for d in room_cgroup(daemon, "memory", room_id).glob("runs/run-*"):
                with contextlib.suppress(OSError, ValueError):  # v2: "max" before the write
                    value = int((d / cg_file(daemon, "memory.limit_in_bytes")).read_text())
                    if value < 1 << 62:  # not the moment between mkdir and the limit's write
                        run_limit.append(value)
            time.sleep(0.01)

    t = threading.Thread(target=watch)
    t.start()
    r = sb.exec("for i in 1 2 3 4 5 6 7 8; do "
                "python3 -c 'import time; b=bytearray(20<<20); time.sleep(2)' & done; wait",
                limits={"wallTimeMs": 30_000})  # 8 interpreters start slowly under emulation
    t.join()
    assert r.raw["oomKilled"] and r.status == "ML", r.raw
    assert run_limit and run_limit[0] == 128 * MiB  # the room's: the init is not under it
    assert psutil.pid_exists(init) and init_pid(daemon, room_id) == init
    host_ok(daemon, sb)


def test_fork_bomb_is_contained_by_pids(client: Any, daemon: DaemonProc, room_id: str) -> None:
    sb = client.sandbox(room_id)
    r = sb.exec("bomb() { bomb | bomb & }; bomb; sleep 1; echo survived",
                limits={"pids": 32, "wallTimeMs": 10_000})
    assert r.stdout == "survived\n" and r.status == "OK", r.raw
    assert r.raw["pidsPeak"] is not None and 8 < r.raw["pidsPeak"] <= 32
    assert r.raw["limitExceeded"] == "pids", r.raw  # the report names the limit it ran into
    host_ok(daemon, sb)


def test_cpu_time_limit_is_to_within_150_ms(client: Any, daemon: DaemonProc,
                                            room_id: str) -> None:
    sb = client.sandbox(room_id)
    r = sb.exec("while :; do :; done", limits={"cpuTimeMs": 500, "wallTimeMs": 10_000})
    assert (r.status, r.raw["limitExceeded"], r.timed_out) == ("TO", "cpu", True), r.raw
    assert 500 <= r.cpu_time_ms <= 650, r.raw
    host_ok(daemon, sb)


def test_wall_time_limit_is_to(client: Any, daemon: DaemonProc, room_id: str) -> None:
    sb = client.sandbox(room_id)
    t0 = time.monotonic()
    r = sb.exec("sleep 100", limits={"wallTimeMs": 300})
    assert (r.status, r.raw["limitExceeded"], r.timed_out) == ("TO", "wall", True), r.raw
    # The lower bound is the contract; the upper one only shows the kill happened (the sleep
    # would take 100 s), with room for a loaded machine. How far past the limit the kill lands
    # is a figure for bench/limits.py, not an assertion here (issue 24).
    assert 300 <= r.wall_time_ms < 10_000 and time.monotonic() - t0 < 20, r.raw
    # A sleeper beats no CPU limit (isolate #72): the wall one holds. Its CPU time is that of
    # starting a shell and sleep(1) (measured alongside: ~2 ms here, ~100x that under the VM
    # tier's emulation), never the wall time it sat there.
    ref = sb.exec("sleep 0")
    assert r.cpu_time_ms <= 2 * ref.cpu_time_ms + 50, (r.raw, ref.raw)
    host_ok(daemon, sb)


ESCAPES = {
    # Stops its whole process group (Piston #196): only a freezer/cgroup.kill reaches it.
    "stops-own-group": ("sh -c 'sleep 300 & kill -STOP 0'", {"wallTimeMs": 500}, "TO"),
    # Double fork: the grandchild is reparented to the room's init and outlives the run's main.
    "double-forks": ("(sh -c 'sleep 301' &); echo parent-done", {}, "OK"),
    # A daemon in a session of its own, ignoring SIGTERM/SIGHUP.
    "setsid-daemon": ("setsid sh -c 'trap \"\" TERM HUP; sleep 302' < /dev/null > /dev/null 2>&1 &"
                      " sleep 0.2", {}, "OK"),
}


@pytest.mark.parametrize("kind", sorted(ESCAPES))
def test_leftovers_are_gone_after_the_run(client: Any, daemon: DaemonProc, room_id: str,
                                          kind: str) -> None:
    sb = client.sandbox(room_id)
    cmd, limits, status = ESCAPES[kind]
    r = sb.exec(cmd, limits=limits or None)
    assert r.status == status, r.raw
    assert "sleep 30" not in sb.exec("ps -eo stat,args").stdout
    host_ok(daemon, sb)


def test_yes_is_ol_with_output_kept_to_the_cap(client: Any, daemon: DaemonProc,
                                              room_id: str) -> None:
    sb = client.sandbox(room_id)
    cap = 256 * 1024
    r = sb.exec("yes", [], limits={"outputBytes": cap, "wallTimeMs": 10_000})
    assert (r.status, r.raw["outputTruncated"], r.raw["limitExceeded"]) == ("OL", True, "output")
    assert r.stdout == "y\n" * (cap // 2)
    host_ok(daemon, sb)


def test_daemon_memory_stays_bounded_whatever_a_run_prints(client: Any, daemon: DaemonProc,
                                                           room_id: str) -> None:
    sb = client.sandbox(room_id)
    assert daemon.proc is not None
    proc = psutil.Process(daemon.proc.pid)  # setpriv and env exec'd into sandboxd: one pid
    before = proc.memory_info().rss
    for stream in ("", ">&2"):
        r = sb.exec(f"head -c 512M /dev/zero {stream}", limits={"outputBytes": MiB})
        assert (r.status, r.raw["outputTruncated"]) == ("OL", True)
        assert len(r.stderr if stream else r.stdout) == MiB  # NUL bytes: one char each
    assert proc.memory_info().rss - before < 32 * MiB
    host_ok(daemon, sb)


def test_disk_filler_gets_enospc_and_the_host_is_untouched(client: Any, daemon: DaemonProc,
                                                          room_id: str) -> None:
    sb = client.sandbox(room_id)
    sb.get({"limits": {"diskBytes": 16 * MiB, "memoryBytes": 256 * MiB}})
    r = sb.exec("dd if=/dev/zero of=/workspace/fill bs=1M count=64")
    assert r.status == "RE" and "No space left on device" in r.stderr, r.raw
    size = int(sb.exec("stat -c %s /workspace/fill").stdout)
    assert 8 * MiB < size <= 16 * MiB
    # A builtin's redirection is the shell's own creat(): no fork per file, so slow machines
    # fill it in time too.
    r = sb.exec("rm /workspace/fill; i=0; while true 2>/dev/null > /tmp/f$i; do i=$((i+1)); done;"
                " echo $i", limits={"wallTimeMs": 20_000})
    assert r.status == "OK" and 900 < int(r.stdout) < 1024, r.raw  # the inode limit: 1024
    # The tmpfs lives in the room's mount namespace: the host's state dir saw none of it.
    room_dir = Path(daemon.state_dir, "rooms", room_key(0, room_id))
    assert sum(f.stat().st_size for f in room_dir.rglob("*") if f.is_file()) < 64 * 1024
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if daemon.state_dir in line]
    host_ok(daemon, sb)


def test_file_size_limit_is_sigxfsz(client: Any, daemon: DaemonProc, room_id: str) -> None:
    sb = client.sandbox(room_id)
    r = sb.exec("dd", ["if=/dev/zero", "of=/tmp/big", "bs=4096", "count=100"],
                limits={"fileSizeBytes": 40_000})
    assert (r.status, r.raw["signal"], r.raw["limitExceeded"]) == ("SG", "SIGXFSZ", "fileSize")
    assert int(sb.exec("stat -c %s /tmp/big").stdout) <= 40_000
    host_ok(daemon, sb)


# --- figures -------------------------------------------------------------------------------------


def test_cpu_time_of_a_1s_busy_loop_within_10_percent(client: Any, daemon: DaemonProc,
                                                      room_id: str) -> None:
    sb = client.sandbox(room_id)
    # Burns 1 s of its own CPU clock (whatever else runs on the host), children included: two
    # processes of 0.5 s each, each printing at exit the CPU time it used in all, interpreter start
    # included. The start costs ~40 ms here and 0.3-0.7 s, varying from run to run, under the VM
    # tier's emulation; a second run without the loop did not subtract it reliably (CI stop 29:
    # 1845 - 684 ms). What the processes measured of themselves does not vary with the run.
    burn = ("python3 -c 'import time\nt=time.process_time()\n"
            "while time.process_time()-t<0.5: pass\nprint(int(time.process_time()*1000))'")
    r = sb.exec(f"{burn} & {burn}; wait")
    assert r.status == "OK", r.raw
    own = [int(x) for x in r.stdout.split()]
    assert len(own) == 2 and min(own) >= 500, r.raw
    # The room's clock counts the same CPU plus the shell and the interpreters' exit: never less,
    # and not more than 10 % (plus 50 ms for the shell) over.
    assert sum(own) - 20 <= r.cpu_time_ms <= sum(own) * 1.1 + 50, (own, r.raw)
    host_ok(daemon, sb)


def test_memory_peak_of_200_mib_within_10_percent(client: Any, daemon: DaemonProc,
                                                  room_id: str) -> None:
    sb = client.sandbox(room_id)
    r = sb.exec("python3 -c 'b=bytearray(200<<20)\nfor i in range(0, len(b), 4096): b[i]=1'")
    assert r.status == "OK"
    assert 180 * MiB <= r.memory_peak_bytes <= 220 * MiB, r.raw
    host_ok(daemon, sb)


def test_room_limits_are_written_at_creation(client: Any, daemon: DaemonProc,
                                             room_id: str) -> None:
    sb = client.sandbox(room_id)
    info = sb.get({"limits": {"memoryBytes": 200 * MiB, "pids": 50, "cpus": 0.5,
                              "diskBytes": 32 * MiB}})
    assert info.options["limits"] == {"memoryBytes": 200 * MiB, "cpus": 0.5, "pids": 50,
                                      "diskBytes": 32 * MiB}
    mem = room_cgroup(daemon, "memory", room_id) / "runs"  # not the init's (issue 10, L4)
    cpu = room_cgroup(daemon, "cpu", room_id)
    if daemon.cgroup_backend == "v2":
        assert int((mem / "memory.max").read_text()) == 200 * MiB
        assert (mem / "memory.swap.max").read_text().strip() == "0"
        assert (cpu / "cpu.max").read_text().split() == ["50000", "100000"]
    else:
        assert int((mem / "memory.limit_in_bytes").read_text()) == 200 * MiB
        memsw = mem / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            assert int(memsw.read_text()) == 200 * MiB  # swap 0
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
    assert (room_cgroup(daemon, "pids", room_id) / "pids.max").read_text().strip() == "50"
    r = sb.exec("df -B1 --output=size / | tail -1")
    assert int(r.stdout) == 32 * MiB
    # A run may not ask for more memory than its room has.
    with pytest.raises(errors.ValidationError):
        sb.exec("true", limits={"memoryBytes": 300 * MiB})
    host_ok(daemon, sb)


def test_cpus_is_a_throttle(client: Any, daemon: DaemonProc, room_id: str) -> None:
    sb = client.sandbox(room_id)
    sb.get({"limits": {"cpus": 0.5}})
    # Two busy processes for 1 s of wall time: half a CPU allows ~500 ms of CPU in all.
    r = sb.exec("timeout 1 sh -c 'while :; do :; done' & timeout 1 sh -c 'while :; do :; done';"
                " wait")
    assert r.status == "OK" and not r.timed_out  # timeout(1) ended them, not our limits
    # Half a CPU over the run's wall time (~1 s here; longer where starting the shells is slow,
    # as under the VM tier's emulation), where the two loops unthrottled would take two.
    assert 0.35 <= r.cpu_time_ms / r.wall_time_ms <= 0.65, r.raw
    host_ok(daemon, sb)


def test_run_limits_go_to_the_run_cgroup(client: Any, daemon: DaemonProc, room_id: str) -> None:
    sb = client.sandbox(room_id)
    sb.exec("true")
    seen: dict[str, str] = {}
    # The previous run's cgroup is removed in the background after its result: not ours.
    before = {d.name for ctl in ("memory", "pids")
              for d in room_cgroup(daemon, ctl, room_id).glob("runs/run-*")}

    # The payload runs until the watcher has read both limits (it drops a marker through a
    # second connection), not for a second that a loaded machine could let pass unseen.
    def watch() -> None:
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            for ctl, f in (("memory", "memory.limit_in_bytes"), ("pids", "pids.max")):
                for d in room_cgroup(daemon, ctl, room_id).glob("runs/run-*"):
                    if d.name in before:
                        continue
                    with contextlib.suppress(OSError):
                        value = (d / cg_file(daemon, f)).read_text().strip()
                        # the moment between mkdir and the write: "max" (v2, pids), or v1's
                        # unlimited memory (a flake when this loop took that for the limit)
                        if value != "max" and not (value.isdigit() and int(value) >= 1 << 62):
                            seen[f] = value
            time.sleep(0.01)
        with daemon.client() as side:
            side.sandbox(room_id).write_file("/workspace/.limits-seen", "")

    sb.exec("rm -f /workspace/.limits-seen")
    t = threading.Thread(target=watch)
    t.start()
    r = sb.exec("n=0; until [ -e /workspace/.limits-seen ] || [ $n -gt 1200 ]; do n=$((n+1)); "
                "sleep 0.05; done; cat /proc/self/cgroup",
                limits={"memoryBytes": 100 * MiB, "pids": 20})
    t.join()
    assert seen == {"memory.limit_in_bytes": str(100 * MiB), "pids.max": "20"}
    assert "run-" in r.stdout  # the payload sat in its run cgroup, not the room's init leaf
    host_ok(daemon, sb)


# --- other backends ------------------------------------------------------------------------------


def _config_daemon(user: Any, text: str, start: bool = True) -> DaemonProc:
    d = make_daemon(user)
    conf = Path(os.path.dirname(d.state_dir), "sandboxd.toml")
    conf.write_text(text)
    os.chmod(conf, 0o644)
    d.extra_args = ["--config", str(conf)]
    if start:
        d.start()
    return d


@pytest.fixture
def disabled_daemon(test_user: Any) -> Iterator[DaemonProc]:
    d = _config_daemon(test_user, 'cgroup_backend = "disabled"\n')
    yield d
    assert d.stop() == 0, d.log()
    assert not d.leftovers()
    shutil.rmtree(os.path.dirname(d.state_dir), ignore_errors=True)


def test_disabled_backend_refuses_cgroup_limits_and_keeps_the_others(
        disabled_daemon: DaemonProc) -> None:
    with Client(disabled_daemon.socket) as c:
        caps = c.ping()["capabilities"]
        assert caps["cgroup"]["backend"] == "disabled"
        assert not {"cpuTimeMs", "memoryBytes", "pids", "cpus"} & set(caps["limits"])
        assert {"wallTimeMs", "outputBytes", "fileSizeBytes", "diskBytes"} <= set(caps["limits"])
        sb = c.sandbox("dis")
        for name, value in (("cpuTimeMs", 100), ("memoryBytes", 64 * MiB), ("pids", 10)):
            with pytest.raises(errors.LimitUnavailable) as exc:
                sb.exec("true", limits={name: value})
            assert exc.value.context["limit"] == name
        with pytest.raises(errors.LimitUnavailable) as exc:
            c.sandbox("dis2").get({"limits": {"memoryBytes": 64 * MiB}})
        assert exc.value.context["limit"] == "memoryBytes"
        r = sb.exec("sleep 100", limits={"wallTimeMs": 300})
        assert (r.status, r.raw["limitExceeded"]) == ("TO", "wall")
        r = sb.exec("yes", [], limits={"outputBytes": 4096})
        assert (r.status, len(r.stdout)) == ("OL", 4096)
        r = sb.exec("dd", ["if=/dev/zero", "of=/tmp/big", "bs=4096", "count=100"],
                    limits={"fileSizeBytes": 40_000})
        assert (r.status, r.raw["signal"]) == ("SG", "SIGXFSZ")
        r = sb.exec("exit 3")
        assert r.status == "RE" and r.cpu_time_ms is not None and r.memory_peak_bytes is None
        (room,) = c.call("stats", {})["sandboxes"]
        assert room["usage"] == {"cpuTimeMs": None, "memoryPeakBytes": None,
                                 "memoryCurrentBytes": None, "pidsCurrent": None,
                                 "pidsPeak": None, "oomKills": None}
        host_ok(disabled_daemon, sb)


class _V2Daemon(DaemonProc):
    """A daemon started inside ``<unified>/<parent>/supervisor``, the way systemd's
    Delegate=yes + DelegateSubgroup=supervisor would start it."""

    cgroup: str = ""

    def start(self, timeout: float = 20.0) -> None:
        procs = os.path.join(self.cgroup, "supervisor", "cgroup.procs")
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        argv = as_user(self.user, [SANDBOXD,
                                   "--socket", self.socket, "--state-dir", self.state_dir,
                                   "--rootfs", self.rootfs, *self.extra_args])

        def enter() -> None:
            with open(procs, "w") as f:
                f.write("0")

        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=enter)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandboxd exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(Exception):
                with Client(self.socket) as c:
                    c.ping()
                return
            time.sleep(0.05)
        raise RuntimeError(f"sandboxd did not come up:\n{self.log()}")


@pytest.fixture
def v2_daemon(test_user: Any) -> Iterator[DaemonProc]:
    if not os.path.exists(os.path.join(V2_ROOT, "cgroup.controllers")):
        pytest.skip("no cgroup2 mount at " + V2_ROOT)
    cg = os.path.join(V2_ROOT, f"sandboxd-limits-{os.getpid()}")
    os.mkdir(cg)
    if not os.path.exists(os.path.join(cg, "cgroup.kill")):
        os.rmdir(cg)
        pytest.skip("cgroup2 without cgroup.kill (kernel < 5.14)")
    os.mkdir(os.path.join(cg, "supervisor"))
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(os.path.join(cg, name), test_user.pw_uid, test_user.pw_gid)
    base = _config_daemon(test_user, 'cgroup_backend = "v2"\n', start=False)
    d = _V2Daemon(user=base.user, socket=base.socket, state_dir=base.state_dir,
                  log_path=base.log_path, rootfs=base.rootfs, extra_args=base.extra_args)
    d.cgroup = cg
    try:
        d.start()
        yield d
        assert d.stop() == 0, d.log()
        assert not os.listdir(os.path.join(d.state_dir, "rooms"))
        assert not [n for n in os.listdir(cg) if n.startswith("room-")]
    finally:
        d.stop(signal.SIGKILL)
        with contextlib.suppress(OSError):
            Path(cg, "cgroup.kill").write_text("1")
        for _ in range(100):
            with contextlib.suppress(OSError):
                for sub in sorted(Path(cg).rglob("*"), key=lambda p: -len(p.parts)):
                    if sub.is_dir():
                        sub.rmdir()
                os.rmdir(cg)
                break
            time.sleep(0.02)
        shutil.rmtree(os.path.dirname(d.state_dir), ignore_errors=True)


def test_v2_backend_kills_whole_runs_and_counts_cpu(v2_daemon: DaemonProc) -> None:
    with Client(v2_daemon.socket) as c:
        caps = c.ping()["capabilities"]
        assert (caps["cgroup"]["backend"], caps["cgroup"]["kill"]) == ("v2", "cgroup.kill")
        assert "cpuTimeMs" in caps["limits"] and "memoryBytes" not in caps["limits"]
        sb = c.sandbox("v2")
        r = sb.exec("cat /proc/self/cgroup")
        assert "0::/../runs/run-r" in r.stdout, r.raw  # seen from the init leaf's namespace
        r = sb.exec("while :; do :; done", limits={"cpuTimeMs": 300, "wallTimeMs": 10_000})
        assert (r.status, r.raw["limitExceeded"]) == ("TO", "cpu")
        assert 300 <= r.raw["cpuTimeMs"] <= 450, r.raw
        r = sb.exec("(sh -c 'sleep 303' &); setsid sleep 304 & sh -c 'sleep 305 & kill -STOP 0'",
                    limits={"wallTimeMs": 400})
        assert (r.status, r.raw["limitExceeded"]) == ("TO", "wall"), r.raw
        assert "sleep 30" not in sb.exec("ps -eo args").stdout
        r = sb.exec("(setsid sleep 306 &); echo started")
        assert r.status == "OK" and "sleep 30" not in sb.exec("ps -eo args").stdout
        with pytest.raises(errors.LimitUnavailable) as exc:
            sb.exec("true", limits={"memoryBytes": 64 * MiB})
        assert exc.value.context["limit"] == "memoryBytes"
        host_ok(v2_daemon, sb)


# --- usage for `sandboxctl top` ------------------------------------------------------------------


def test_stats_reports_room_usage(client: Any, daemon: DaemonProc, room_id: str) -> None:
    sb = client.sandbox(room_id)
    sb.get({"limits": {"memoryBytes": 256 * MiB}})
    before = client.call("stats", {"sandboxId": room_id})["sandboxes"][0]["usage"]["cpuTimeMs"]
    burn = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass"
    r = sb.exec("python3", ["-c", burn])
    out = client.call("stats", {"sandboxId": room_id})
    assert out["backend"] == daemon.cgroup_backend and out["backend"] in ("v1", "v2")
    (room,) = out["sandboxes"]
    assert (room["sandboxId"], room["activeRuns"], room["limits"]["memoryBytes"]) == (
        room_id, 0, 256 * MiB)
    use = room["usage"]
    # The room's CPU time grew by the run's (which burned 300 ms, plus what starting python
    # costs here: ~30 ms, over a second under the VM tier's emulation), give or take the init.
    assert r.cpu_time_ms >= 300, r.raw
    assert r.cpu_time_ms - 50 <= use["cpuTimeMs"] - before <= r.cpu_time_ms + 150, (use, r.raw)
    assert use["pidsCurrent"] >= 1 and use["memoryPeakBytes"] > 0 and use["oomKills"] == 0
    listed = {s["sandboxId"] for s in client.call("stats", {})["sandboxes"]}
    assert room_id in listed
    with pytest.raises(errors.SandboxNotFound):
        client.call("stats", {"sandboxId": "no-such-room-here"})
    host_ok(daemon, sb)


def test_sandboxctl_limit_options_report_and_top(client: Any, daemon: DaemonProc,
                                                 room_id: str) -> None:
    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SANDBOXCTL, "--socket", daemon.socket, *args],
                              capture_output=True, text=True, timeout=60)

    r = ctl("exec", "--report", "--cpu-time", "0.3", room_id, "--", "sh", "-c",
            "while :; do :; done")
    assert r.returncode == 124, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("sandboxctl: status=TO signal=SIGKILL cpu=") and "limit=cpu" in line
    r = ctl("sh", "--report", "--memory", "64M", room_id,
            "python3 -c 'a=[]\nwhile 1: a.append(bytearray(1<<20))'")
    assert r.returncode == 137 and "status=ML" in r.stderr and "mem=64.0MiB" in r.stderr
    r = ctl("exec", "--report", "--output-limit", "1K", room_id, "--", "yes")
    assert (r.stdout, "status=OL" in r.stderr) == ("y\n" * 512, True), r.stderr
    # The 8th process cannot be forked: the shell gives up (exit 2), the room keeps going.
    r = ctl("sh", "--report", "--pids", "8", room_id, "for i in 1 2 3 4 5 6 7 8 9 10; do "
            "sleep 1 & done 2>/dev/null; wait")
    assert r.returncode != 0 and "status=RE" in r.stderr and "pids=8" in r.stderr, r.stderr
    r = ctl("exec", "--memory", "lots", room_id, "--", "true")
    assert r.returncode == 2
    r = ctl("top", "--once")
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split()[:3] == ["ROOM", "RUNS", "CPU%"]
    assert any(row.split()[0] == room_id for row in rows)
    host_ok(daemon, client.sandbox(room_id))
