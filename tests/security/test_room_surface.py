"""What a room sees and can change of its own surface, and what the daemon holds for it.

Issue 10: L6 (/dev writable: room code replaced /dev/null for later runs), M4 (the host's tree
path in mountinfo, a daemon-wide run counter in /proc/self/cgroup), judge fidelity (1) a run
could not reopen its own stdio by path and (3) /run hid the tree's /run/lock; H5 (oversized
argv failed after the run's pipes and cgroup existed and held fds; the daemon kept the soft fd
limit of 1024); L3 (the zygote's sys.path[0] was the daemon's cwd).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import sec_helpers as h

from sandboxd import errors

sec_user = h.sec_user
client_users = h.client_users
sec_daemon = h.sec_daemon
sec_client = h.sec_client
rooms = h.rooms

pytestmark = [pytest.mark.security, pytest.mark.integration]


def test_dev_cannot_be_replaced_for_later_runs(rooms: Any) -> None:
    (sb,) = rooms(1)
    r = sb.exec("rm -f /dev/null; echo x > /dev/evil; ln -sf /tmp/out /dev/stdout2;"
                " mv /dev/urandom /dev/u2; ls /dev")
    assert "evil" not in r.stdout and "u2" not in r.stdout and "stdout2" not in r.stdout
    assert "Read-only file system" in r.stderr
    # The next run finds the devices it expects.
    r = sb.exec("test -c /dev/null && test -c /dev/urandom && echo hi > /dev/null && echo ok")
    assert r.stdout == "ok\n"
    # The writable places under /dev stay writable: ptys and shared memory.
    assert sb.exec("echo x > /dev/shm/f && cat /dev/shm/f").stdout == "x\n"


def test_run_reopens_its_own_stdio_by_path(rooms: Any) -> None:
    (sb,) = rooms(1)
    r = sb.exec("cat /dev/stdin; echo err > /dev/stderr; echo out > /dev/stdout", stdin="in\n")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "in\nout\n", "err\n")
    # The judge idiom: freopen() of a link to /dev/stdin (fork path too: a size limit).
    r = sb.exec("ln -sf /dev/stdin in_link && python3 -c \"print(open('in_link').read().upper())\"",
                stdin="judge\n", limits={"fileSizeBytes": 1 << 20})
    assert r.stdout == "JUDGE\n\n", r


def test_run_lock_exists_and_is_writable(rooms: Any) -> None:
    (sb,) = rooms(1)
    r = sb.exec("stat -c %a /run/lock && touch /run/lock/x && echo ok")
    assert r.stdout == "1777\nok\n", r


def test_run_ids_are_per_room(rooms: Any) -> None:
    """/proc/self/cgroup names the run's cgroup: with a daemon-wide counter a room saw how many
    runs every other tenant started in between."""
    a, b = rooms(2)

    def run_no() -> int:
        text = b.exec("cat /proc/self/cgroup").stdout
        nums = [int(n) for n in re.findall(r"run-r(\d+)", text)]
        assert nums, text
        return nums[0]

    first = run_no()
    for _ in range(5):
        a.exec("true")
    assert run_no() == first + 1


def test_mountinfo_hides_the_host_tree_path(sec_user: Any) -> None:
    tree = os.environ.get("SANDBOXD_TEST_LANG_ROOTFS")
    if not tree:
        from conftest import skip_unless_ci

        skip_unless_ci("SANDBOXD_TEST_LANG_ROOTFS is not set: scripts/test.sh sets it once the "
                       "built tree exists (.ci/rootfs.sh)")
        return
    real = os.path.realpath(tree)
    d = h.start_daemon(sec_user, rootfs=tree)
    try:
        with h.client_of(d) as c:
            text = c.sandbox("mi").exec("cat /proc/self/mountinfo").stdout
            assert "overlay" in text
            for leak in {tree, real, os.path.dirname(real), d.state_dir}:
                assert leak not in text, f"{leak} shows in the room's mountinfo:\n{text}"
    finally:
        h.stop_and_check(d)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_oversized_argv_is_refused_before_anything_exists(sec_daemon: Any, rooms: Any) -> None:
    (sb,) = rooms(1)
    sb.exec("true")
    pid = h.daemon_pid(sec_daemon)
    before = _fds(pid)
    for big in (["x" * (300 * 1024)], ["y" * 1000] * 300):
        with pytest.raises(errors.ValidationError) as err:
            sb.exec("echo", big)
        assert err.value.context.get("limit") == "argvEnvBytes"
    with pytest.raises(errors.ValidationError):
        sb.exec("true", [], env={"BIG": "z" * (300 * 1024)})
    assert _fds(pid) <= before, "the refused runs left fds in the daemon"
    assert "Traceback" not in sec_daemon.log()[-20000:].split("argvEnvBytes")[-1]
    # Just under the cap still runs.
    assert sb.exec("sh", ["-c", "echo ${#1}", "sh", "a" * (100 * 1024)]).stdout == "102400\n"


def test_daemon_raises_its_soft_fd_limit(sec_user: Any) -> None:
    """Started with the usual soft limit of 1024 (under a hard one above it), the daemon takes
    the hard limit for itself; rooms get 1024 back."""
    import resource

    soft0, hard0 = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard0 > 1024, "this host's hard fd limit leaves nothing to raise"
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard0))
    try:
        d = h.start_daemon(sec_user)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft0, hard0))
    try:
        limits = Path(f"/proc/{h.daemon_pid(d)}/limits").read_text()
        soft, hard = re.findall(r"Max open files\s+(\d+)\s+(\d+)", limits)[0]
        assert int(soft) == int(hard) == hard0, limits
        with h.client_of(d) as c:
            assert c.sandbox("fd").exec("ulimit -n").stdout == "1024\n"
    finally:
        h.stop_and_check(d)


def test_zygote_runs_isolated_from_the_daemon_cwd(sec_daemon: Any) -> None:
    zygotes = sec_daemon.zygote_pids()
    assert zygotes
    for z in zygotes:  # (its cmdline is its title by now; -I is checked in test_unit_jail)
        assert os.readlink(f"/proc/{z}/cwd") == "/"
