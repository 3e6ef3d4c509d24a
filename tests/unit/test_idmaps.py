"""jail/user.py without a daemon: /etc/subuid parsing, the choice of mapping mode (and every
reason to fall back to the single-id mapping), id slices and their cross-daemon locks, the uid
maps written for a real child in a new user namespace, and the room's user-counter ceilings
against a fake procfs."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from sandboxd.jail import _syscalls, messages, user
from sandboxd.jail.user import IdMap, IdPlan


def _subids(tmp_path: Path, uid_lines: str, gid_lines: str | None = None) -> dict[str, str]:
    (tmp_path / "subuid").write_text(uid_lines)
    (tmp_path / "subgid").write_text(uid_lines if gid_lines is None else gid_lines)
    return {"subuid": str(tmp_path / "subuid"), "subgid": str(tmp_path / "subgid")}


@pytest.fixture
def helpers_ok(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(user, "_helper_ok", lambda name: True)
    yield


# --- /etc/subuid ----------------------------------------------------------------------------------


def test_subordinate_range_takes_the_largest_of_the_user(tmp_path: Path) -> None:
    f = tmp_path / "subuid"
    f.write_text("alice:100000:65536\n"
                 "bob:165536:65536\n"
                 "alice:1000000:1048576\n"  # a bigger, later range: this one
                 "alice:2000000:4096\n"
                 "alice:x:5\n"             # malformed lines are ignored
                 "alice:5\n"
                 " alice:3000000:9999999 trailing\n"
                 "1001:400000:65536\n")
    assert user.subordinate_range("alice", str(f)) == (1000000, 1048576)
    assert user.subordinate_range("bob", str(f)) == (165536, 65536)
    assert user.subordinate_range("1001", str(f)) == (400000, 65536)
    assert user.subordinate_range("carol", str(f)) is None
    assert user.subordinate_range("alice", str(tmp_path / "missing")) is None


# --- plan(): the mode and its reasons -------------------------------------------------------------


def test_plan_subordinate_slices(tmp_path: Path, helpers_ok: None) -> None:
    files = _subids(tmp_path, "sbx:100000:65536\n", "sbx:300000:70000\n")
    p = user.plan("sbx", 1500, 1500, lock_dir=None, **files)
    assert (p.mode, p.uid_start, p.gid_start, p.slices) == ("subordinate", 100000, 300000, 16)
    assert p.reason == "no private directory for slice locks: another daemon of this user " \
        "could hand out the same slices"
    d = p.describe()
    assert d == {"mode": "subordinate", "sandboxUser": True, "sliceSize": 4096, "slices": 16,
                 "slicesFree": 16, "uidStart": 100000, "gidStart": 300000,
                 "lockedAcrossDaemons": False, "reason": p.reason}
    # ranges named by uid work too
    files = _subids(tmp_path, "1500:100000:8192\n")
    p = user.plan("sbx", 1500, 1500, lock_dir=str(tmp_path), **files)
    assert (p.mode, p.slices, p.reason, p.lock_dir) == ("subordinate", 2, "", str(tmp_path))


@pytest.mark.parametrize(("uids", "gids", "uid", "why"), [
    ("", "", 1500, "sbx has no subordinate uids (sandboxctl setup --user sbx)"),
    ("sbx:100000:65536\n", "", 1500, "sbx has no subordinate gids"),
    ("", "", 0, "the daemon runs as root and root has no subordinate range"),
    ("sbx:100000:4095\n", None, 1500, "sbx's subordinate range holds fewer than 4096 ids"),
    # a range over the daemon's own uid (or gid) would give a room the daemon's ids
    ("sbx:1000:65536\n", None, 1500, "sbx's subordinate range contains its own uid/gid"),
    ("sbx:100000:65536\n", "sbx:1:65536\n", 1500, "contains its own uid/gid"),
])
def test_plan_falls_back_to_single(tmp_path: Path, helpers_ok: None, uids: str,
                                   gids: str | None, uid: int, why: str) -> None:
    p = user.plan("sbx", uid, 1500, lock_dir=None, **_subids(tmp_path, uids, gids))
    assert p.mode == "single" and why in p.reason
    assert (p.uid_start, p.gid_start) == (uid, 1500)
    assert p.acquire() == IdMap(uid, 1500, 1)
    d = p.describe()
    assert d["mode"] == "single" and d["sandboxUser"] is False and d["cost"] == user.SINGLE_COST


def test_plan_needs_setuid_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(user, "_helper_ok", lambda name: name == "newuidmap")
    p = user.plan("sbx", 1500, 1500, lock_dir=None, **_subids(tmp_path, "sbx:100000:65536\n"))
    assert p.mode == "single" and "newuidmap/newgidmap missing or not setuid" in p.reason


def test_helper_ok_wants_setuid_root_or_file_caps(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    tool = tmp_path / "newuidmap"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert user._helper_ok("newuidmap") is False  # plain executable
    assert user._helper_ok("newgidmap") is False  # not there at all
    if os.geteuid() == 0:
        os.chown(tool, 0, 0)
        tool.chmod(0o4755)
        assert user._helper_ok("newuidmap") is True


# --- slices ---------------------------------------------------------------------------------------


def test_slices_acquire_release_and_exhaust() -> None:
    p = IdPlan("subordinate", 100000, 200000, slices=2, slice_size=10)
    a, b = p.acquire(), p.acquire()
    assert a == IdMap(100000, 200000, 10, 0) and b == IdMap(100010, 200010, 10, 1)
    assert not a.single and a.maps(9) and not a.maps(10) and not a.maps(-1)
    with pytest.raises(user.SlicesExhausted, match="all 2 id slices"):
        p.acquire()
    p.release(a)
    p.release(None)
    p.release(user.single(5, 6))  # the single mapping holds no slice
    assert p.acquire() == a
    assert p.describe()["slicesFree"] == 0


def test_quarantined_slices_are_skipped_and_counted() -> None:
    p = IdPlan("subordinate", 100000, 200000, slices=3, slice_size=10, quarantined={0, 2})
    assert p.acquire().slice == 1
    with pytest.raises(user.SlicesExhausted):
        p.acquire()
    assert p.describe()["slicesFree"] == 0


def test_slice_locks_keep_two_daemons_apart(tmp_path: Path) -> None:
    one = IdPlan("subordinate", 100000, 100000, slices=2, slice_size=10, lock_dir=str(tmp_path))
    two = IdPlan("subordinate", 100000, 100000, slices=2, slice_size=10, lock_dir=str(tmp_path))
    a = one.acquire()
    assert a.slice == 0 and two.acquire().slice == 1  # two skips what one holds
    with pytest.raises(user.SlicesExhausted):
        two.acquire()
    one.release(a)  # the flock goes with the release: two may now take it
    assert two.acquire().slice == 0
    assert sorted(os.listdir(tmp_path)) == ["100000-0.lock", "100000-1.lock"]
    assert stat.S_IMODE(os.stat(tmp_path / "100000-0.lock").st_mode) == 0o600


def test_idmap_crosses_the_channel_inside_a_room_spec() -> None:
    m = IdMap(100000, 200000, 4096, 3)
    spec = messages.RoomSpec(room_id="r", rootfs="/", scratch="/s", disk_bytes=1, hostname="h",
                             cgroup_procs=[], cgroup_home_by_dir=False, ids=m)
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=messages.RoomSpec)
    assert back.ids == m and type(back.ids) is IdMap
    assert msgspec.convert({"uid_base": 1, "gid_base": 2}, IdMap) == IdMap(1, 2, 1, -1)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"uid_base": "1", "gid_base": 2}, IdMap)
    s = user.single()
    assert s.single and (s.uid_base, s.gid_base) == (os.getuid(), os.getgid())
    assert s.maps(0) and not s.maps(user.SANDBOX_UID)


def test_quarantine_is_a_no_op_in_single_mode(tmp_path: Path) -> None:
    assert IdPlan("single", 1, 1).quarantine_busy(str(tmp_path / "no-proc")) == []


# --- the private lock directory -------------------------------------------------------------------


def test_private_lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uid = os.getuid()
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    path = user.private_lock_dir(uid)
    assert path == str(run / "sandboxd" / "id-slices")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    run.chmod(0o755)  # readable by others: not private
    assert user.private_lock_dir(uid) is None
    run.chmod(0o700)
    assert user.private_lock_dir(uid + 1) is None  # not owned by the uid asked for
    squat = tmp_path / "squat"
    squat.write_text("")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(squat))  # not a directory at all
    assert user.private_lock_dir(uid) is None


# --- maps for a real child in a new user namespace ------------------------------------------------


def _in_new_userns() -> tuple[int, int]:
    """A child that unshared its user namespace and waits until ``go`` closes: (pid, go)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_w)  # (else the read below never sees the parent's close)
            os.close(ready_r)
            _syscalls.unshare(_syscalls.CLONE_NEWUSER)
            os.write(ready_w, b"x")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    return pid, go_w


def test_write_maps_single_denies_setgroups_first() -> None:
    pid, go = _in_new_userns()
    try:
        user.write_maps(pid, IdMap(os.getuid(), os.getgid(), 1))
        assert Path(f"/proc/{pid}/setgroups").read_text().strip() == "deny"
        assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["0", str(os.getuid()), "1"]
        assert Path(f"/proc/{pid}/gid_map").read_text().split() == ["0", str(os.getgid()), "1"]
    finally:
        os.close(go)
        os.waitpid(pid, 0)


def test_write_maps_subordinate_calls_the_helpers(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "calls"
    for tool in ("newuidmap", "newgidmap"):
        script = tmp_path / tool
        script.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {log}\n"
                          f"[ \"$2\" = 0 ] || {{ echo 'bad map' >&2; exit 1; }}\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    user.write_maps(4242, IdMap(100000, 200000, 4096, 0))
    assert log.read_text().splitlines() == ["newuidmap 4242 0 100000 4096",
                                            "newgidmap 4242 0 200000 4096"]
    (tmp_path / "newgidmap").write_text("#!/bin/sh\necho 'newgidmap: write to gid_map failed: "
                                        "Operation not permitted' >&2\nexit 1\n")
    with pytest.raises(OSError, match="newgidmap 7 0 200000 4096 failed: newgidmap: write"):
        user.write_maps(7, IdMap(100000, 200000, 4096, 0))


# --- user-counter ceilings ------------------------------------------------------------------------


def test_cap_room_ucounts_on_a_fake_procfs(tmp_path: Path) -> None:
    (tmp_path / "sys" / "user").mkdir(parents=True)
    (tmp_path / "sys" / "fs" / "inotify").mkdir(parents=True)
    (tmp_path / "sys" / "fs" / "inotify" / "max_user_instances").write_text("128\n")
    (tmp_path / "sys" / "fs" / "inotify" / "max_user_watches").write_text("16\n")
    for name in ("max_inotify_instances", "max_inotify_watches", "max_fanotify_groups"):
        (tmp_path / "sys" / "user" / name).write_text("")  # (a real one: written whole)
    # max_fanotify_marks is missing (an older kernel): skipped, not an error
    done = user.cap_room_ucounts(str(tmp_path))
    assert done == {"max_inotify_instances": 16, "max_inotify_watches": 4,  # floor of 4
                    "max_fanotify_groups": 0}
    for name, value in done.items():
        assert (tmp_path / "sys" / "user" / name).read_text() == str(value)


def test_quarantine_busy_skips_zombies_and_other_users(tmp_path: Path) -> None:
    p = IdPlan("subordinate", 100000, 100000, slices=4, slice_size=10)
    procs = {"1": ("S", 0), "20": ("S", 100012), "21": ("Z", 100035), "22": ("R", 100039),
             "23": ("X", 100001), "24": ("S", 100040)}  # 100040: past the last slice
    for pid, (state, uid) in procs.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "status").write_text(
            f"Name:\tx\nState:\t{state} (x)\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (tmp_path / "self").mkdir()
    (tmp_path / "30").mkdir()  # vanished while we looked: no status
    (tmp_path / "31").mkdir()
    (tmp_path / "31" / "status").write_text("Uid:\tnot-a-number\n")
    assert p.quarantine_busy(str(tmp_path)) == [1, 3]
    assert p.quarantined == {1, 3}
    assert p.acquire().slice == 0 and p.acquire().slice == 2
