"""One owner of the daemon user's subordinate id range (issue 22): scripts/install.sh gave
``sandboxd`` 100000-165535, then ``sandboxctl setup`` warned "fewer than 1048576; adding a full
range" and added a second one. Both now call ``hostsetup.ensure_subids`` with its one size."""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path

import pytest

from sandboxd import hostsetup
from sandboxd.jail import user as jail_user

INSTALL_SH = Path(__file__).resolve().parents[2] / "scripts" / "install.sh"


def _install_snippet() -> str:
    """The Python that install.sh runs for step 5 (its heredoc that calls ensure_subids)."""
    text = INSTALL_SH.read_text()
    snippets = [s for s in re.findall(r"<<'EOF'\n(.*?)\nEOF\n", text, re.S)
                if "ensure_subids" in s]
    assert len(snippets) == 1, snippets
    return snippets[0]


def test_the_size_is_enough_for_the_rooms_issue_18_asks_for() -> None:
    assert hostsetup.SLICE_IDS == jail_user.SLICE_SIZE
    assert hostsetup.SUBID_COUNT == hostsetup.ROOM_SLICES * jail_user.SLICE_SIZE
    assert hostsetup.ROOM_SLICES >= 1000
    assert hostsetup.SETUP_SUBID_COUNT == hostsetup.SUBID_COUNT


def test_install_sh_then_setup_give_one_range(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    u, g = tmp_path / "subuid", tmp_path / "subgid"
    for f in (u, g):
        f.write_text("someone:100000:65536\n")
    monkeypatch.setattr(hostsetup, "SUBUID", str(u))
    monkeypatch.setattr(hostsetup, "SUBGID", str(g))
    # As root, a real unprivileged user (chown must work); otherwise ourselves, "as root".
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    gid = 65534 if os.geteuid() == 0 else os.getegid()
    home = tmp_path / "home"
    home.mkdir()
    fake = pwd.struct_passwd(("sandboxd", "x", uid, gid, "", str(home), "/bin/sh"))
    real_getpwnam = pwd.getpwnam
    monkeypatch.setattr(pwd, "getpwnam",
                        lambda name: fake if name == "sandboxd" else real_getpwnam(name))
    if os.geteuid() != 0:
        monkeypatch.setattr(os, "geteuid", lambda: 0)
    os.chmod(tmp_path, 0o755)

    exec(compile(_install_snippet(), str(INSTALL_SH), "exec"), {})  # install.sh, step 5
    lines = hostsetup.setup("sandboxd", str(tmp_path / "state"), tmp_root=str(tmp_path),
                            run_user_root=str(tmp_path / "run"), tmpfiles_dir=None,
                            cgroups=False)

    for path in (u, g):
        mine = [e for e in hostsetup.read_subids(str(path)) if e.owner == "sandboxd"]
        assert [e.count for e in mine] == [hostsetup.SUBID_COUNT], (path, mine)
    subid_lines = [line for line in lines if "subordinate" in line]
    assert len(subid_lines) == 2 and all("already has" in line for line in subid_lines), lines


def test_a_smaller_older_range_is_named_when_the_full_one_is_added(tmp_path: Path) -> None:
    u, g = tmp_path / "subuid", tmp_path / "subgid"
    u.write_text("erin:100000:65536\n")
    g.write_text("erin:100000:65536\n")
    actions = hostsetup.ensure_subids("erin", 54321, subuid_path=str(u), subgid_path=str(g))
    assert actions[0] == (f"warning: erin's largest subordinate uid range in {u} (100000-165535) "
                          f"holds fewer than {hostsetup.SUBID_COUNT} ids; adding one that does "
                          "(the daemon uses the largest)")
    assert jail_user.subordinate_range("erin", str(u)) == (165536, hostsetup.SUBID_COUNT)
