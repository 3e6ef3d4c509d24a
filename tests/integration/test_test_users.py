"""The suite makes its own users (issue 11): conftest's ``_ensure_user`` / ``_setup_user`` from
nothing, through throw-away users ``sbxfresh<hex>`` (never one of the shared ``sbx*`` users, which
parallel runs are using), deleted again at the end.

Several processes set the same new user up at once, as parallel pytest runs do on a fresh
machine: without the flock, useradd of the losers fails ("user already exists") and two setups
can hand out overlapping subordinate ranges.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NO_SUBIDS, _ensure_user, _users_lock

from sandboxd.hostsetup import SETUP_SUBID_COUNT, SUBGID, SUBUID, read_subids

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="creates and deletes users: root")]

TESTS = str(Path(__file__).resolve().parents[1])
CTRLS = ("memory", "pids", "cpu", "cpuacct", "freezer", "unified")


def _delete(name: str) -> None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return
    with _users_lock():
        subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)
    for ctl in CTRLS:
        with contextlib.suppress(OSError):
            os.rmdir(f"/sys/fs/cgroup/{ctl}/sandboxd/{name}")
    with contextlib.suppress(OSError):
        os.unlink(f"/etc/tmpfiles.d/sandboxd-{name}.conf")
    shutil.rmtree(f"/tmp/sandboxd-{pw.pw_uid}", ignore_errors=True)


@pytest.fixture
def fresh_name() -> Iterator[str]:
    name = f"sbxfresh{secrets.token_hex(3)}"
    yield name
    _delete(name)
    assert not [e for p in (SUBUID, SUBGID) for e in read_subids(p) if e.owner == name], \
        "userdel left subordinate ids behind"


def _mine(path: str, name: str) -> list[tuple[int, int]]:
    return [(e.start, e.end) for e in read_subids(path) if e.owner == name]


def test_concurrent_setup_of_a_new_user(fresh_name: str) -> None:
    """Eight processes run ``_setup_user`` for a user that does not exist yet, released together:
    all succeed, and the user ends up with exactly one range of setup's size per file, shared
    with nobody, and its delegated cgroups."""
    with pytest.raises(KeyError):
        pwd.getpwnam(fresh_name)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import conftest; print(flush=True); "
            "sys.stdin.read(); conftest._setup_user(sys.argv[2])")
    procs = [subprocess.Popen([sys.executable, "-c", code, TESTS, fresh_name],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    for p in procs:  # a barrier: every child has imported everything before any may go
        assert p.stdout is not None
        p.stdout.readline()
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
    results = []
    for p in procs:
        assert p.stdout is not None and p.stderr is not None
        with p.stdout, p.stderr:
            err = p.stderr.read()
        results.append((p.wait(120), err))
    assert all(rc == 0 for rc, _ in results), results
    pw = pwd.getpwnam(fresh_name)
    for path in (SUBUID, SUBGID):
        mine = _mine(path, fresh_name)
        # useradd's own login.defs range may come first; a race would add a second setup range.
        assert len([r for r in mine if r[1] - r[0] >= SETUP_SUBID_COUNT]) == 1, (path, mine)
        others = [e for e in read_subids(path) if e.owner != fresh_name]
        for lo, hi in mine:
            assert not [e for e in others if e.start < hi and lo < e.end], (path, others)
    if os.path.isdir("/sys/fs/cgroup/pids/sandboxd"):
        assert os.stat(f"/sys/fs/cgroup/pids/sandboxd/{fresh_name}").st_uid == pw.pw_uid
    before = (Path(SUBUID).read_text(), Path(SUBGID).read_text())
    assert _ensure_user(fresh_name) == pw  # idempotent: nothing added the second time
    assert (Path(SUBUID).read_text(), Path(SUBGID).read_text()) == before


def test_new_user_gets_subids_unless_single(fresh_name: str) -> None:
    """A plain ``_ensure_user`` gives subordinate ids whatever login.defs says; a user that must
    have none (``sbxsingle``'s kind) gets none, even from useradd's defaults."""
    assert "sbxsingle" in NO_SUBIDS
    pw = _ensure_user(fresh_name)
    assert pw.pw_dir and os.path.isdir(pw.pw_dir)
    assert _mine(SUBUID, fresh_name) and _mine(SUBGID, fresh_name)
    single = fresh_name + "s"
    try:
        _ensure_user(single, subids=False)
        assert not _mine(SUBUID, single) and not _mine(SUBGID, single)
    finally:
        _delete(single)
