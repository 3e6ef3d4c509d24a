"""Persistence against a real daemon (issue 25): backups round-trip contents, modes, links and
mtimes; a backup taken while a process writes is a consistent state; restore into another room;
fork gives two independent rooms; export/import moves a workspace between two daemons; backups
survive SIGTERM and SIGKILL of the daemon; expiry; quotas; tenants do not see each other's."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    SANDBOXCTL,
    DaemonProc,
    _ensure_user,
    _setup_user,
    make_daemon,
    skip_unless_ci,
)
from test_tenants import GROUP, call, tenants  # noqa: F401 - the two-tenant daemon fixture

from sandboxd import errors

pytestmark = pytest.mark.integration

# A file set with every kind of entry a backup must keep: contents (text, binary, empty), modes,
# a symlink inside and one pointing out, a hard link, an empty directory, old mtimes.
MAKE_TREE = r"""
set -e
cd /workspace
mkdir -p src/pkg empty deep/a/b/c
printf 'hello\n' > src/hello.txt
head -c 300000 /dev/urandom > src/blob.bin
: > src/empty.txt
printf '#!/bin/sh\necho run\n' > src/run.sh && chmod 750 src/run.sh
chmod 600 src/hello.txt
chmod 711 deep/a
ln -s hello.txt src/link
ln -s /etc/passwd src/outside
ln src/hello.txt src/hard
printf 'x' > deep/a/b/c/leaf
touch -h -d '2001-02-03 04:05:06' src/link
touch -d '2002-03-04 05:06:07' src/hello.txt deep/a/b/c/leaf empty
"""

# One line per entry: path, type, mode, link count, size, mtime, symlink target, content hash.
LISTING = r"""
cd "${1:-/workspace}" && find . -mindepth 1 ! -name '.sandboxd-restore.*' \
  -printf '%p %y %m %n %s %T@ %l ' \
  -exec sh -c 'if [ -f "$1" ] && [ ! -L "$1" ]; then md5sum < "$1"; else echo -; fi' sh {} \; \
  | LC_ALL=C sort
"""


def listing(sb: Any, d: str = "/workspace") -> str:
    res = sb.exec("sh", ["-c", LISTING, "sh", d])
    assert res.exit_code == 0, res.stderr
    return res.stdout


def test_backup_restore_round_trip_keeps_contents_modes_links_and_mtimes(client: Any,
                                                                        room_id: str) -> None:
    sb = client.sandbox(room_id)
    assert sb.exec(MAKE_TREE).exit_code == 0
    before = listing(sb)
    assert "./src/link l 777" in before and "./empty d" in before
    info = sb.create_backup(name="first")
    assert info.backup_id.startswith("bk-") and info.size_bytes > 0 and info.dir == "/workspace"
    assert info.name == "first" and len(info.sha256) == 64
    assert [b.backup_id for b in client.list_backups(room_id)] == [info.backup_id]
    # Damage everything, then restore: the listing is the same, entry for entry.
    assert sb.exec("rm -rf /workspace/src /workspace/empty; echo new > /workspace/extra; "
                   "chmod 700 /workspace/deep/a").exit_code == 0
    assert listing(sb) != before
    got = sb.restore_backup(info.backup_id)
    assert (got.dir, got.backup_id) == ("/workspace", info.backup_id)
    after = listing(sb)
    assert after == before
    # The hard link is still one inode with two names (link count 2 and both listed).
    assert sb.exec("[ src/hello.txt -ef src/hard ]", cwd="/workspace").exit_code == 0
    # Nothing of the staging directory is left.
    assert sb.exec("ls -A /workspace | grep -c sandboxd-restore").stdout.strip() == "0"
    assert client.delete_backup(info.backup_id).deleted is True
    assert client.delete_backup(info.backup_id).deleted is False
    with pytest.raises(errors.BackupNotFound):
        sb.restore_backup(info.backup_id)
    sb.destroy()


def test_excludes_and_another_directory(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    assert sb.exec("mkdir -p /workspace/app/node_modules/x /workspace/app/.git /home/sandbox/w "
                   "&& echo 1 > /workspace/app/keep.js && echo 2 > /workspace/app/debug.log "
                   "&& echo 3 > /workspace/app/node_modules/x/i.js && echo 4 > "
                   "/workspace/app/.git/HEAD && echo home > /home/sandbox/w/f").exit_code == 0
    info = sb.create_backup("/workspace/app", excludes=["node_modules", ".git", "*.log"])
    assert info.dir == "/workspace/app"
    other = client.sandbox(room_id + "-b")
    other.restore_backup(info.backup_id, "/workspace/copy")
    names = other.exec("cd /workspace/copy && find . | sort").stdout.split()
    assert names == [".", "./keep.js"]
    home = sb.create_backup("/home/sandbox")
    other.restore_backup(home.backup_id)
    assert other.read_file("/home/sandbox/w/f").text == "home\n"
    # A directory that is not there, or that leads out of itself through a symlink.
    with pytest.raises(errors.FileNotFound):
        sb.create_backup("/workspace/none")
    assert sb.exec("ln -s /etc /workspace/etclink").exit_code == 0
    with pytest.raises(errors.FileNotFound, match="symlink"):
        sb.create_backup("/workspace/etclink")
    with pytest.raises(errors.ValidationError):
        sb.create_backup("/")
    with pytest.raises(errors.InvalidParams):
        sb.create_backup(excludes=[""])
    for r in (sb, other):
        r.destroy()


def test_a_backup_while_a_process_writes_is_one_consistent_state(client: Any,
                                                                  room_id: str) -> None:
    """A writer rewrites 40 files of 256 KiB in rounds, each file holding the round's number:
    a consistent copy holds at most two adjacent rounds (the one being written and the last),
    in write order. An unfrozen tar, reading for longer than a round takes, sees more."""
    sb = client.sandbox(room_id)
    writer = (
        "import os\n"
        "os.makedirs('/workspace/w', exist_ok=True)\n"
        "r = 0\n"
        "while True:\n"
        "    r += 1\n"
        "    for i in range(40):\n"
        "        with open(f'/workspace/w/f{i:02d}', 'w') as f:\n"
        "            f.write((str(r) + '\\n') * 26000)\n"
    )
    sb.write_file("/workspace/writer.py", writer)
    proc = sb.start_process("python3", ["/workspace/writer.py"], process_id="writer")
    assert sb.exec("sleep 0.5; ls /workspace/w | wc -l").stdout.strip() == "40"
    for attempt in range(3):
        info = sb.create_backup("/workspace/w")
        check = client.sandbox(f"{room_id}-c{attempt}")
        check.restore_backup(info.backup_id)
        # Per file: its first line and its line count (the file being rewritten at the
        # instant of the copy may be empty or part-written: that is the state it was in).
        rows = check.exec("for i in $(seq -w 0 39); do echo \"$(head -n1 /workspace/w/f$i) "
                          "$(wc -l < /workspace/w/f$i)\"; done").stdout.splitlines()
        assert len(rows) == 40, rows
        whole = [(i, int(r.split()[0])) for i, r in enumerate(rows)
                 if len(r.split()) == 2 and r.split()[1] == "26000"]
        assert len(whole) >= 39, rows  # at most one file mid-write
        values = [v for _, v in whole]
        # Write order f00..f39: a prefix of round r and the rest of round r-1 (or all one).
        assert max(values) - min(values) <= 1, rows
        assert values == sorted(values, reverse=True), rows
        check.destroy()
    # The writer kept going through all of it (it was frozen, not killed).
    assert sb.get_process("writer").status == "running"
    proc.kill()
    sb.destroy()


def test_fork_copies_the_writable_layer_and_both_rooms_run_on(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    sb.get({"limits": {"memoryBytes": 256 * 1024 * 1024}, "env": {"ROOMVAR": "one"}})
    assert sb.exec("echo ws > /workspace/a; echo tmp > /tmp/t; mkdir -p /home/sandbox; "
                   "echo home > /home/sandbox/h; echo root > /root/r").exit_code == 0
    proc = sb.start_process("sleep", ["300"], process_id="sleeper")
    fork = sb.fork(room_id + "-fork")
    info = fork.get()
    assert info.options["limits"]["memoryBytes"] == 256 * 1024 * 1024
    assert info.options["env"] == {"ROOMVAR": "one"}
    got = fork.exec("cat /workspace/a /tmp/t /home/sandbox/h /root/r; echo $ROOMVAR").stdout
    assert got.split() == ["ws", "tmp", "home", "root", "one"]
    # The source kept running; the two are independent from here on.
    assert sb.get_process("sleeper").status == "running"
    assert fork.list_processes() == []
    fork.write_file("/workspace/a", "changed")
    assert sb.read_file("/workspace/a").text == "ws\n"
    sb.write_file("/workspace/only-source", "x")
    assert fork.exists("/workspace/only-source") is False
    with pytest.raises(errors.SandboxExists):
        sb.fork(room_id + "-fork")
    with pytest.raises(errors.SandboxNotFound):
        client.sandbox(room_id + "-none").fork(room_id + "-x")
    proc.kill()
    fork.destroy()
    sb.destroy()


def test_export_and_import_between_two_daemons(daemon: DaemonProc, test_user: Any,
                                               room_id: str, tmp_path: Path) -> None:
    with daemon.client() as c:  # type: ignore[attr-defined]
        sb = c.sandbox(room_id)
        assert sb.exec(MAKE_TREE).exit_code == 0
        before = listing(sb)
        out = io.BytesIO()
        res = sb.export(out)
        data = out.getvalue()
        assert res.size_bytes == len(data) and res.chunks >= 1 and res.dir == "/workspace"
        # What the host receives is a plain gzip'd tar: the entries read back with tarfile.
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
            members = {m.name: m for m in tf.getmembers()}
        assert members["./src/hello.txt"].mode == 0o600
        assert members["./src/link"].issym() and members["./src/link"].linkname == "hello.txt"
        assert members["./src/hard"].islnk() or members["./src/hello.txt"].islnk()
        assert int(members["./src/hello.txt"].mtime) == int(time.mktime(
            time.strptime("2002-03-04 05:06:07", "%Y-%m-%d %H:%M:%S")))
        assert members["./empty"].isdir()
        sb.destroy()
    other = make_daemon(test_user)
    other.start()
    try:
        with other.client() as c2:  # type: ignore[attr-defined]
            sb2 = c2.sandbox("moved")
            sb2.write_file("/workspace/old", "replaced by the import")
            got = sb2.import_archive(io.BytesIO(data))
            assert got.imported and got.size_bytes == len(data) and got.sha256 == res.sha256
            assert listing(sb2) == before
            sb2.destroy()
    finally:
        assert other.stop() == 0
        assert not other.leftovers()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_backups_survive_a_daemon_restart(fresh_daemon: DaemonProc, how: int) -> None:
    d = fresh_daemon
    d.start()
    with d.client() as c:  # type: ignore[attr-defined]
        sb = c.sandbox("keep")
        sb.write_file("/workspace/f", "kept")
        info = sb.create_backup(name="before-restart")
    d.stop(how)
    d.start()
    with d.client() as c:  # type: ignore[attr-defined]
        assert [b.backup_id for b in c.list_backups()] == [info.backup_id]
        sb = c.sandbox("after")
        sb.restore_backup(info.backup_id)
        assert sb.read_file("/workspace/f").text == "kept"
    assert d.stop() == 0


def test_a_daemon_killed_mid_backup_lists_no_half_written_backup(fresh_daemon: DaemonProc
                                                                  ) -> None:
    d = fresh_daemon
    d.start()
    with d.client() as c:  # type: ignore[attr-defined]
        sb = c.sandbox("big")
        done = sb.create_backup()
        assert sb.exec("head -c 200000000 /dev/urandom > /workspace/big").exit_code == 0
    import threading

    def backup() -> None:
        with d.client() as c:  # type: ignore[attr-defined]
            try:
                c.sandbox("big").create_backup()
            except errors.SandboxError:
                pass

    t = threading.Thread(target=backup, daemon=True)
    t.start()
    # Kill it while the room's tar or gzip is at work (they show as room processes).
    deadline = time.monotonic() + 30
    while not any(("tar" in x or "gzip" in x) for x in d.leftovers(settle=0)):
        assert time.monotonic() < deadline, "the backup never started"
        time.sleep(0.02)
    d.stop(signal.SIGKILL)
    t.join(30)
    d.start()
    with d.client() as c:  # type: ignore[attr-defined]
        assert [b.backup_id for b in c.list_backups()] == [done.backup_id]
    files = [p for p in Path(d.state_dir, "backups").rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == sorted(
        [f"{done.backup_id}.json", f"{done.backup_id}.tgz"]), files
    assert d.stop() == 0


def test_ttl_expiry_and_the_storage_quota(test_user: Any) -> None:
    """The quotas bind tenants (root and the daemon's uid are exempt): the client here is
    another user in the daemon's socket group."""
    if os.geteuid() != 0:
        skip_unless_ci("needs root to create users")
    owner = _setup_user("sbxsec", groups=(GROUP,))
    tenant = _ensure_user("sbxtest", groups=(GROUP,))
    d = make_daemon(owner)
    cfg = os.path.join(os.path.dirname(d.state_dir), "sandboxd.toml")
    settings = {"max_backup_bytes": 1024 * 1024, "max_backup_bytes_per_uid": 3 * 1024 * 1024,
                "max_backup_ttl_s": 3600, "socket_group": GROUP}
    Path(cfg).write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    os.chmod(cfg, 0o644)
    d.extra_args += ["--config", cfg]
    d.start()

    def sh(line: str) -> Any:
        return call(tenant, d, "exec", {"sandboxId": "q", "command": line})

    def backup(**extra: Any) -> Any:
        return call(tenant, d, "createBackup", {"sandboxId": "q", **extra})

    try:
        assert backup(ttlSeconds=7200) == {"error": "VALIDATION_FAILED"}
        short = backup(ttlSeconds=1)
        assert short["expiresAt"]
        time.sleep(1.2)
        assert call(tenant, d, "restoreBackup", {"sandboxId": "q", "backupId": short[
            "backupId"]}) == {"error": "BACKUP_EXPIRED"}
        assert call(tenant, d, "listBackups", {})["backups"] == []
        # Incompressible data: 2 MB is over the 1 MiB maximum size of one backup.
        sh("head -c 2000000 /dev/urandom > /workspace/r")
        assert backup() == {"error": "QUOTA_EXCEEDED"}
        # 700 KB each: four fit under 3 MiB, the fifth does not.
        sh("rm /workspace/r; head -c 700000 /dev/urandom > /workspace/r")
        for _ in range(4):
            assert backup()["sizeBytes"] > 700000
        assert backup() == {"error": "QUOTA_EXCEEDED"}
        listed = call(tenant, d, "listBackups", {})["backups"]
        assert len(listed) == 4
        # The room is still fine, and deleting one makes room again.
        assert sh("echo ok")["stdout"] == "ok\n"
        call(tenant, d, "deleteBackup", {"backupId": listed[0]["backupId"]})
        assert backup()["backupId"]
        call(tenant, d, "destroy", {"sandboxId": "q"})
    finally:
        assert d.stop() == 0
        assert not d.leftovers()


def test_a_backup_belongs_to_the_uid_that_made_it(tenants: Any) -> None:  # noqa: F811
    d, a, b = tenants
    made = call(a, d, "createBackup", {"sandboxId": "mine"})
    bid = made["backupId"]
    assert call(b, d, "listBackups", {})["backups"] == []
    assert call(b, d, "restoreBackup", {"sandboxId": "theirs", "backupId": bid}) == {
        "error": "BACKUP_NOT_FOUND"}
    assert call(b, d, "deleteBackup", {"backupId": bid})["deleted"] is False
    assert [x["backupId"] for x in call(a, d, "listBackups", {})["backups"]] == [bid]
    assert call(a, d, "deleteBackup", {"backupId": bid})["deleted"] is True
    for user, room in ((a, "mine"), (b, "theirs")):
        call(user, d, "destroy", {"sandboxId": room})


def test_the_cli_backs_up_restores_forks_exports_and_imports(daemon: DaemonProc, client: Any,
                                                             room_id: str,
                                                             tmp_path: Path) -> None:
    def ctl(*args: str, stdin: Any = None, stdout: Any = None) -> Any:
        res = subprocess.run([SANDBOXCTL, "--socket", daemon.socket, *args], stdin=stdin,
                             stdout=stdout if stdout is not None else subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=120, check=False)
        assert res.returncode == 0, res.stderr
        return res

    sb = client.sandbox(room_id)
    sb.write_file("/workspace/cli.txt", "via the cli\n")
    bid = ctl("backup", room_id, "--name", "cli").stdout.decode().strip()
    assert bid.startswith("bk-")
    assert bid in ctl("backups", room_id).stdout.decode()
    sb.delete_file("/workspace/cli.txt")
    ctl("restore", room_id, bid)
    assert sb.read_file("/workspace/cli.txt").text == "via the cli\n"
    ctl("fork", room_id, room_id + "-f")
    assert client.sandbox(room_id + "-f").read_file("/workspace/cli.txt").text == "via the cli\n"
    archive = tmp_path / "ws.tgz"
    with open(archive, "wb") as out:
        ctl("export", room_id, stdout=out)
    with tarfile.open(archive) as tf:
        assert "./cli.txt" in tf.getnames()
    with open(archive, "rb") as inp:
        ctl("import", room_id + "-i", stdin=inp)
    assert client.sandbox(room_id + "-i").read_file("/workspace/cli.txt").text == "via the cli\n"
    assert "deleted" in ctl("unbackup", bid).stdout.decode()
    for r in (room_id, room_id + "-f", room_id + "-i"):
        client.sandbox(r).destroy()


def wait_status(c: Any, room: str, status: str | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = {s.sandbox_id: s.status for s in c.list_sandboxes()}.get(room)
        if got == status:
            return
        assert time.monotonic() < deadline, (room, got, status)
        time.sleep(0.2)


def test_sleep_with_snapshot_then_any_call_wakes_the_room_with_its_files(
        fresh_daemon: DaemonProc) -> None:
    d = fresh_daemon
    cfg = os.path.join(os.path.dirname(d.state_dir), "sandboxd.toml")
    Path(cfg).write_text("idle_timeout_s = 2.0\n")
    os.chmod(cfg, 0o644)
    d.extra_args += ["--config", cfg]
    d.start()
    with d.client() as c:  # type: ignore[attr-defined]
        sleepy = c.sandbox("sleepy")
        sleepy.get({"sleepAfter": 1, "onIdle": "snapshot", "env": {"KEPT": "yes"},
                    "limits": {"memoryBytes": 200 * 1024 * 1024}})
        assert sleepy.exec("mkdir -p /home/sandbox; echo ws > /workspace/a; "
                           "echo home > /home/sandbox/h; ln -s a /workspace/l").exit_code == 0
        c.sandbox("kept").get({"onIdle": "keep"})
        c.sandbox("gone").exec("true")  # default: destroyed after idle_timeout_s
        wait_status(c, "sleepy", "stopped")
        wait_status(c, "gone", None)
        # Any method wakes it: here a file read, then the rest is there as well.
        assert sleepy.read_file("/workspace/a").text == "ws\n"
        info = sleepy.get()
        assert info.options["env"] == {"KEPT": "yes"} and info.options["onIdle"] == "snapshot"
        assert info.options["limits"]["memoryBytes"] == 200 * 1024 * 1024
        assert sleepy.exec("cat /home/sandbox/h; readlink /workspace/l; echo $KEPT"
                           ).stdout.split() == ["home", "a", "yes"]
        assert {s.sandbox_id: s.status for s in c.list_sandboxes()}["kept"] == "ready"
        # Asleep again, then the daemon is killed: the stopped room survives the restart.
        wait_status(c, "sleepy", "stopped")
    d.stop(signal.SIGKILL)
    d.start()
    with d.client() as c:  # type: ignore[attr-defined]
        assert {s.sandbox_id: s.status for s in c.list_sandboxes()}.get("sleepy") == "stopped"
        assert c.sandbox("sleepy").exec("cat /workspace/a").stdout == "ws\n"
        # destroy of a stopped room drops its saved layer: the next call gets an empty room.
        wait_status(c, "sleepy", "stopped")
        assert c.sandbox("sleepy").destroy().destroyed is True
        assert c.sandbox("sleepy").exists("/workspace/a") is False
        c.sandbox("sleepy").destroy()
        c.sandbox("kept").destroy()
    assert d.stop() == 0
    assert not d.leftovers()
