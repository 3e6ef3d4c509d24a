"""Id slices (jail/user.py) without a daemon: the plan, allocation, release and quarantine.

Runs anywhere (no root): /etc/subuid-format files and a fake /proc are written to tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sandboxd.jail import user

pytestmark = pytest.mark.security


def _files(tmp_path: Path, text: str) -> tuple[str, str]:
    u, g = tmp_path / "subuid", tmp_path / "subgid"
    u.write_text(text)
    g.write_text(text)
    return str(u), str(g)


def test_plan_uses_the_largest_range_and_keeps_uid_1000_inside(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    monkeypatch.setattr(user, "_helper_ok", lambda name: True)
    u, g = _files(tmp_path, "alice:100000:65536\nalice:300000:1048576\n")
    plan = user.plan("alice", 1001, 1001, subuid=u, subgid=g, lock_dir=None)
    assert (plan.mode, plan.uid_start, plan.slices) == ("subordinate", 300000, 256)
    a, b = plan.acquire(), plan.acquire()
    assert (a.uid_base, b.uid_base) == (300000, 300000 + 4096)
    assert a.maps(user.SANDBOX_UID) and not a.maps(4096)
    plan.release(a)
    assert plan.acquire().uid_base == 300000  # released slices are reused


def test_plan_falls_back_to_single_and_says_why(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(user, "_helper_ok", lambda name: True)
    u, g = _files(tmp_path, "bob:100000:65536\n")
    plan = user.plan("alice", 1001, 1001, subuid=u, subgid=g, lock_dir=None)
    assert plan.mode == "single" and "no subordinate" in plan.reason
    assert plan.acquire() == user.IdMap(1001, 1001, 1)
    assert not plan.acquire().maps(user.SANDBOX_UID)
    assert plan.describe()["sandboxUser"] is False and plan.describe()["cost"]
    # A range too small for one slice, or one that holds the daemon's own uid: single too.
    u, g = _files(tmp_path, "alice:100000:1000\n")
    assert user.plan("alice", 1001, 1001, subuid=u, subgid=g, lock_dir=None).mode == "single"
    u, g = _files(tmp_path, "alice:1000:65536\n")
    assert user.plan("alice", 1001, 1001, subuid=u, subgid=g, lock_dir=None).mode == "single"
    monkeypatch.setattr(user, "_helper_ok", lambda name: False)
    u, g = _files(tmp_path, "alice:100000:65536\n")
    assert "newuidmap" in user.plan("alice", 1001, 1001, subuid=u, subgid=g, lock_dir=None).reason


def test_exhausted_slices_refuse_instead_of_sharing(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(user, "_helper_ok", lambda name: True)
    u, g = _files(tmp_path, "alice:100000:8192\n")
    plan = user.plan("alice", 1001, 1001, subuid=u, subgid=g, lock_dir=None)
    plan.acquire()
    plan.acquire()
    with pytest.raises(user.SlicesExhausted):
        plan.acquire()


def test_slices_with_leftover_processes_are_quarantined(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart must not give a new room the ids of a process still running (it could then
    signal or ptrace it)."""
    monkeypatch.setattr(user, "_helper_ok", lambda name: True)
    u, g = _files(tmp_path, "alice:100000:65536\n")
    plan = user.plan("alice", 1001, 1001, subuid=u, subgid=g, lock_dir=None)
    proc = tmp_path / "proc"
    for pid, uid in ((10, 100000 + 1000), (11, 100000 + 3 * 4096), (12, 0)):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "status").write_text(f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    assert plan.quarantine_busy(str(proc)) == [0, 3]
    got = [plan.acquire().slice for _ in range(3)]
    assert got == [1, 2, 4]
    assert plan.describe()["slicesFree"] == 16 - 2 - 3


def test_root_daemon_uses_roots_range_or_says_it_maps_host_root(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    monkeypatch.setattr(user, "_helper_ok", lambda name: True)
    u, g = _files(tmp_path, "root:500000:65536\n")
    assert user.plan("root", 0, 0, subuid=u, subgid=g, lock_dir=None).uid_start == 500000
    u, g = _files(tmp_path, "")
    plan = user.plan("root", 0, 0, subuid=u, subgid=g, lock_dir=None)
    assert plan.mode == "single" and "host uid 0" in plan.reason


def test_two_daemons_of_one_user_never_share_a_slice(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Both draw from the same range: the flock on each slice keeps them apart, and a slice
    comes free for the other when its holder releases it (or dies: the kernel drops flocks)."""
    monkeypatch.setattr(user, "_helper_ok", lambda name: True)
    u, g = _files(tmp_path, "alice:100000:12288\n")
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    one = user.plan("alice", 1001, 1001, subuid=u, subgid=g, lock_dir=str(locks))
    two = user.plan("alice", 1001, 1001, subuid=u, subgid=g, lock_dir=str(locks))
    a, b = one.acquire(), two.acquire()
    assert (a.slice, b.slice) == (0, 1)
    c = one.acquire()
    assert c.slice == 2
    with pytest.raises(user.SlicesExhausted):
        two.acquire()
    one.release(a)
    assert two.acquire().slice == 0
    assert one.describe()["lockedAcrossDaemons"] is True


def test_zombies_do_not_quarantine_their_slice(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 23 D7: a quick restart found dead rooms' zombies (not yet reaped) and quarantined
    their slices (253 free of 256). A zombie can be neither signalled nor ptraced to effect."""
    monkeypatch.setattr(user, "_helper_ok", lambda name: True)
    u, g = _files(tmp_path, "alice:100000:65536\n")
    plan = user.plan("alice", 1001, 1001, subuid=u, subgid=g, lock_dir=None)
    proc = tmp_path / "proc"
    for pid, state, k in ((10, "Z (zombie)", 0), (11, "S (sleeping)", 2), (12, "X (dead)", 5)):
        uid = 100000 + k * 4096
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "status").write_text(
            f"Name:\tx\nState:\t{state}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    assert plan.quarantine_busy(str(proc)) == [2]
