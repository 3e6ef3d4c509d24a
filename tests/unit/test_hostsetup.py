"""hostsetup: subordinate id allocation on temporary files, safe directory creation, doctor."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from sandboxd import hostsetup, kernel
from sandboxd.hostsetup import SubIdRange, allocate, ensure_subids, parse_subids

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")

OTHER_UID = 54321  # an id nobody on the test host is expected to use
SMALL = 65536  # the older tests give small ranges (the default is hostsetup.SUBID_COUNT)


# --- subordinate ids ---------------------------------------------------------------------------


def test_parse_skips_comments_and_junk() -> None:
    text = "# comment\nalice:100000:65536\n\nbob:x:1\ncarol:200000\n1001:300000:10\nneg:-5:3\n"
    assert parse_subids(text) == [SubIdRange("alice", 100000, 65536),
                                  SubIdRange("1001", 300000, 10)]


def test_allocate_first_fit() -> None:
    assert allocate([], count=SMALL) == 100000
    assert allocate([SubIdRange("a", 100000, 65536)], count=SMALL) == 165536
    # A hole big enough between two entries is used; a too-small one is skipped.
    entries = [SubIdRange("a", 100000, 65536), SubIdRange("b", 165536 + 65536, 65536),
               SubIdRange("c", 400000, 10)]
    assert allocate(entries, count=SMALL) == 165536
    small_hole = [SubIdRange("a", 100000, 65536), SubIdRange("b", 165536 + 100, 65536)]
    assert allocate(small_hole, count=SMALL) == 165536 + 100 + 65536
    # Entries below the minimum, overlapping it, or unsorted.
    assert allocate([SubIdRange("x", 90000, 20000), SubIdRange("y", 0, 5)], count=SMALL) == 110000
    assert allocate([SubIdRange("b", 300000, 5), SubIdRange("a", 100000, 5)], count=10) == 100005


def test_allocate_exhausted() -> None:
    with pytest.raises(hostsetup.SetupError, match="no free range"):
        allocate([SubIdRange("a", 100000, 1000)], count=1000, hi=101500)


@pytest.fixture
def subid_files(tmp_path: Path) -> tuple[Path, Path]:
    u, g = tmp_path / "subuid", tmp_path / "subgid"
    u.write_text("alice:100000:65536\nbob:165536:65536\n")
    g.write_text("alice:100000:65536\n")  # bob has no gids; carol's start must avoid his uids
    os.chmod(u, 0o644)
    return u, g


def test_ensure_subids_adds_matching_non_overlapping_ranges(subid_files: tuple[Path, Path]
                                                            ) -> None:
    u, g = subid_files
    actions = ensure_subids("carol", OTHER_UID, subuid_path=str(u), subgid_path=str(g),
                            count=SMALL)
    assert actions == [f"subordinate uids: gave carol 231072-296607 in {u}",
                       f"subordinate gids: gave carol 231072-296607 in {g}"]
    assert u.read_text().endswith("bob:165536:65536\ncarol:231072:65536\n")
    assert g.read_text() == "alice:100000:65536\ncarol:231072:65536\n"
    assert stat.S_IMODE(u.stat().st_mode) == 0o644
    # Idempotent: a second run changes nothing.
    before = (u.read_text(), g.read_text())
    again = ensure_subids("carol", OTHER_UID, subuid_path=str(u), subgid_path=str(g),
                          count=SMALL)
    assert all("already has 231072-296607" in a for a in again)
    assert (u.read_text(), g.read_text()) == before
    ranges = parse_subids(u.read_text())
    for a in ranges:
        for b in ranges:
            assert a is b or a.end <= b.start or b.end <= a.start


def test_ensure_subids_fills_only_the_missing_file(subid_files: tuple[Path, Path]) -> None:
    u, g = subid_files
    actions = ensure_subids("bob", OTHER_UID, subuid_path=str(u), subgid_path=str(g),
                            count=SMALL)
    assert actions[0].startswith("subordinate uids: bob already has 165536-231071")
    assert actions[1] == f"subordinate gids: gave bob 165536-231071 in {g}"


def test_ensure_subids_counts_entries_by_uid_and_creates_missing_files(tmp_path: Path) -> None:
    u, g = tmp_path / "subuid", tmp_path / "subgid"
    u.write_text(f"{OTHER_UID}:500000:65536")  # numeric owner, no trailing newline
    actions = ensure_subids("dave", OTHER_UID, subuid_path=str(u), subgid_path=str(g),
                            count=SMALL)
    assert "already has 500000-565535" in actions[0]
    assert g.read_text() == "dave:100000:65536\n"


def test_ensure_subids_replaces_a_too_small_range(tmp_path: Path) -> None:
    u, g = tmp_path / "subuid", tmp_path / "subgid"
    u.write_text("erin:100000:100\n")
    g.write_text("erin:100000:65536\n")
    actions = ensure_subids("erin", OTHER_UID, subuid_path=str(u), subgid_path=str(g),
                            count=SMALL)
    assert actions[0].startswith("warning:")
    assert u.read_text() == "erin:100000:100\nerin:100100:65536\n"


# --- directories -------------------------------------------------------------------------------


@root_only
def test_ensure_dir_creates_with_owner_and_mode(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    target = home / ".local" / "state" / "sandboxd"
    msg = hostsetup.ensure_dir(str(target), OTHER_UID, OTHER_UID, user_home=str(home))
    assert msg.startswith("created")
    for d in (home / ".local", home / ".local" / "state", target):
        st = d.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (OTHER_UID, OTHER_UID, 0o700)
    assert "already exists" in hostsetup.ensure_dir(str(target), OTHER_UID, OTHER_UID)
    os.chmod(target, 0o755)
    assert "fixed" in hostsetup.ensure_dir(str(target), OTHER_UID, OTHER_UID)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


@root_only
def test_ensure_dir_refuses_a_user_planted_symlink(tmp_path: Path) -> None:
    """~/.local/state -> /somewhere root owns: following it would hand that place to the user."""
    home = tmp_path / "home"
    (home / ".local").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (home / ".local" / "state").symlink_to(victim)
    os.lchown(home / ".local" / "state", OTHER_UID, OTHER_UID)
    with pytest.raises(hostsetup.SetupError, match="symlink"):
        hostsetup.ensure_dir(str(home / ".local" / "state"), OTHER_UID, OTHER_UID,
                             user_home=str(home))
    with pytest.raises(hostsetup.SetupError, match="symlink"):
        hostsetup.ensure_dir(str(home / ".local" / "state" / "sandboxd"), OTHER_UID, OTHER_UID)
    assert victim.stat().st_uid == 0
    assert os.listdir(victim) == []


@root_only
def test_ensure_dir_follows_root_symlinks_in_root_only_dirs(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to("real")  # relative, root-owned, in a root-only directory
    msg = hostsetup.ensure_dir(str(tmp_path / "link" / "sd"), OTHER_UID, OTHER_UID)
    assert msg.startswith(f"created {real / 'sd'}")
    assert (real / "sd").stat().st_uid == OTHER_UID


@root_only
def test_ensure_dir_refuses_a_squatted_directory(tmp_path: Path) -> None:
    squat = tmp_path / "sandboxd-1001"
    squat.mkdir()
    os.chown(squat, OTHER_UID + 1, OTHER_UID + 1)
    with pytest.raises(hostsetup.SetupError, match="belongs to uid"):
        hostsetup.ensure_dir(str(squat), OTHER_UID, OTHER_UID)


# --- setup -------------------------------------------------------------------------------------


def test_setup_requires_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(hostsetup.SetupError, match="as root"):
        hostsetup.setup("nobody")


@root_only
def test_setup_unknown_user() -> None:
    with pytest.raises(hostsetup.SetupError, match="no such user"):
        hostsetup.setup("no-such-user-sbx")


@root_only
def test_setup_end_to_end_on_temporary_paths(tmp_path: Path) -> None:
    user = pwd.getpwuid(65534).pw_name  # nobody: exists everywhere, never root
    os.chmod(tmp_path, 0o755)
    for name in ("subuid", "subgid"):
        (tmp_path / name).write_text("")
    (tmp_path / "tmpfiles").mkdir()
    (tmp_path / "tmp").mkdir(mode=0o755)
    kwargs = {"subuid_path": str(tmp_path / "subuid"), "subgid_path": str(tmp_path / "subgid"),
              "tmp_root": str(tmp_path / "tmp"), "run_user_root": str(tmp_path / "run"),
              "tmpfiles_dir": str(tmp_path / "tmpfiles"), "cgroups": False}
    state = tmp_path / "state" / "sandboxd"
    first = hostsetup.setup(user, str(state), **kwargs)  # type: ignore[arg-type]
    assert any(a.startswith("subordinate uids: gave") for a in first)
    assert state.stat().st_uid == 65534
    runtime = tmp_path / "tmp" / "sandboxd-65534"
    assert runtime.stat().st_uid == 65534 and stat.S_IMODE(runtime.stat().st_mode) == 0o700
    conf = (tmp_path / "tmpfiles" / f"sandboxd-{user}.conf").read_text()
    assert f"d {runtime} 0700 {user} " in conf
    second = hostsetup.setup(user, str(state), **kwargs)  # type: ignore[arg-type]
    assert not any("gave" in a or "created" in a or "wrote" in a for a in second), second


# --- doctor ------------------------------------------------------------------------------------


def test_doctor_returns_checks() -> None:
    checks = hostsetup.doctor(daemon=False)
    names = [c.name for c in checks]
    for expected in ("user namespaces", "overlayfs in a user namespace", "subordinate ids",
                     "rootfs"):
        assert expected in names
    assert any(n.startswith("cgroup") for n in names)
    assert all(isinstance(c, hostsetup.Check) and c.detail for c in checks)
    # Essential: the two namespace probes and the kernel interfaces a room cannot work without
    # (sandboxd.kernel's required ones), nothing else (a cgroup or rootfs problem only degrades).
    required = {f"kernel interface {f.name}" for f in kernel.probe() if f.required}
    assert required, "openat2 and pidfd_open are required"
    assert {c.name for c in checks if c.essential} == {"user namespaces",
                                                       "overlayfs in a user namespace"} | required
    assert all(c.cost for c in checks if not c.ok)


def test_doctor_reports_a_missing_daemon(tmp_path: Path) -> None:
    checks = hostsetup.doctor(socket=str(tmp_path / "none.sock"))
    daemon = checks[-1]
    assert (daemon.name, daemon.ok) == ("daemon", False)
    assert "none.sock" in daemon.detail


@root_only
def test_doctor_as_another_user_runs_the_probes_as_that_user() -> None:
    user = pwd.getpwuid(65534).pw_name
    checks = {c.name: c for c in hostsetup.doctor(user=user, daemon=False)}
    assert user in checks["user namespaces"].detail


def test_probe_reports_what_the_child_raised() -> None:
    def fail() -> None:
        raise OSError(5, "boom")

    assert hostsetup._probe(lambda: None) is None
    err = hostsetup._probe(fail)
    assert err is not None and "boom" in err
