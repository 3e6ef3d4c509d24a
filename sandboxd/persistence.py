"""Durable rooms: backups, restore, fork, export and import (docs/persistence.md).

Theory of operation. The daemon never reads or writes a room's files itself: every archive is
made and unpacked by the tree's own ``tar`` running *inside* a room, as an ordinary run (its
cgroup, seccomp filter, wall-clock deadline, and an RLIMIT_FSIZE that bounds what it may write),
with the daemon handing it an open file of the state dir as its stdout (archiving) or stdin
(unpacking) — ``runs.RunSpec.stdout_fd`` / ``stdin_fd``. A hostile archive therefore meets a
tar that runs as the room's root in the room's mount namespace: it can reach nothing of the
host, and the restore script below keeps it inside the target directory.

Archiving (``createBackup``, ``forkSandbox``, ``exportSandbox``), in two runs:

1. *frozen copy*: every other run of the room (background processes included) is frozen through
   its cgroup (v1 freezer, v2 cgroup.freeze) while ``tar --create`` writes an uncompressed
   archive to an unlinked (O_TMPFILE) file of the state dir; then they are thawed. The pause is
   the time tar takes to read the files (tmpfs: memory speed), not the compression.
2. *compression*: ``gzip -1`` in the room from that file to a second unlinked file, bounded by
   the maximum backup size; the result is fsynced and only then linked under its final name,
   and its metadata (JSON, written to a temp name, fsynced, renamed) is what makes it listed.
   A crash at any point leaves nothing half-written listed.

Unpacking (``restoreBackup``, ``importSandbox``): a script in the room resolves the target
directory without following a symlink out of it, unpacks into a staging directory *inside* the
target (same filesystem, so the swap is renames), strips set-id bits, and only when tar
succeeded replaces the target's contents; a failure (no space, a refused member) removes the
staging directory and leaves the target as it was. GNU tar refuses members with ``..``, strips a
leading ``/``, and extracts symlinks that point outside as placeholders until the end, so a
"symlink, then a file through it" archive cannot write past the target; device nodes cannot be
made in a user namespace; the room's disk budget bounds a decompression bomb.

Storage: ``<state_dir>/backups/<uid>/<backupId>.tgz`` and ``.json`` (0700 per uid: a backup
belongs to the uid that made it; another uid gets BACKUP_NOT_FOUND). Quotas: the bytes of one
uid's backups (``max_backup_bytes_per_uid``) and the size of one backup (``max_backup_bytes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import posixpath
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from . import errors, runs
from .jail import JailError
from .jail.cgroup.interface import RunCgroup
from .jail.mnt import WRITABLE_DIRS
from .roomfiles import check_path
from .rooms import Room, RoomManager, iso

log = logging.getLogger(__name__)

BACKUP_ID = re.compile(r"^bk-[0-9a-f]{16}$")
MAX_EXCLUDES = 256
MAX_NAME = 256
#: What a run of tar or gzip may take before it is killed (the caller's wall clock).
ARCHIVE_TIMEOUT_MS = 10 * 60 * 1000
#: Extra bytes an uncompressed archive may take beyond the room's disk (tar's headers).
TAR_SLACK = 64 * 1024 * 1024
#: Entries of the writable layer (relative to /) that forkSandbox copies.
LAYER_DIRS = tuple(d for d, _ in WRITABLE_DIRS)
STAGE_PREFIX = ".sandboxd-restore."
#: An expired backup's record is kept (BACKUP_EXPIRED rather than BACKUP_NOT_FOUND) this long.
EXPIRED_RECORD_S = 7 * 24 * 3600

# Archive the directory $1 (resolved without leaving it) to stdout; "$@" are tar's options.
_ARCHIVE_SH = r"""
d=$1; shift
cd -P -- "$d" 2>/dev/null || { echo "sandboxd: no such directory: $d" >&2; exit 66; }
[ "$(pwd -P)" = "$d" ] || { echo "sandboxd: $d leads out of itself (a symlink)" >&2; exit 67; }
# /tmp/.sandboxd is the code-run cache (the daemon's, not the room's files)
[ "$d" = /tmp ] && set -- --exclude=./.sandboxd "$@"
exec tar --create --format=posix --file=- --numeric-owner --exclude="./$SANDBOXD_STAGE*" "$@" .
"""

# Archive the writable layer (the directories named in "$@", relative to /) to stdout.
_LAYER_SH = r"""
cd / && exec tar --create --format=posix --file=- --numeric-owner --ignore-failed-read \
    --exclude=tmp/.sandboxd -- "$@"
"""

# Unpack stdin (gzip'd tar) into the directory $1, replacing its contents only on success.
_RESTORE_SH = r"""
d=$1
# The part of $d that exists must be free of symlinks before mkdir -p could follow one.
p=$d
while [ ! -e "$p" ] && [ ! -L "$p" ]; do p=$(dirname -- "$p"); done
{ cd -P -- "$p" 2>/dev/null && [ "$(pwd -P)" = "$p" ]; } ||
    { echo "sandboxd: $d leads out of itself (a symlink)" >&2; exit 67; }
mkdir -p -- "$d" 2>/dev/null
cd -P -- "$d" 2>/dev/null || { echo "sandboxd: cannot make directory: $d" >&2; exit 66; }
[ "$(pwd -P)" = "$d" ] || { echo "sandboxd: $d leads out of itself (a symlink)" >&2; exit 67; }
st="$SANDBOXD_STAGE$$"
rm -rf -- "$st"
mkdir -m 700 -- "$st" || exit 68
if ! tar --extract --gzip --file=- --numeric-owner --directory="$st" --no-overwrite-dir; then
    rm -rf -- "$st"
    exit 65
fi
find "$st" -perm /6000 -exec chmod ug-s -- {} + 2>/dev/null
[ "$d" = /tmp ] && rm -rf -- "$st/.sandboxd"
mode=$(stat -c %a -- "$st"); mtime=$(stat -c %Y -- "$st")
keep=$st; [ "$d" = /tmp ] && keep=.sandboxd  # the code-run cache stays
find . -mindepth 1 -maxdepth 1 ! -name "$st" ! -name "$keep" -exec rm -rf -- {} + || exit 69
find "$st" -mindepth 1 -maxdepth 1 -exec mv -f -t . -- {} + || exit 69
rmdir -- "$st"
chmod "$mode" . 2>/dev/null
touch -d "@$mtime" . 2>/dev/null
exit 0
"""

# Unpack stdin (gzip'd tar of the layer) at / of a fresh room (forkSandbox).
_LAYER_RESTORE_SH = r"""
tar --extract --gzip --file=- --numeric-owner --directory=/ || exit 65
for d in "$@"; do find "/$d" -perm /6000 -exec chmod ug-s -- {} + 2>/dev/null; done
exit 0
"""


class BackupMeta(msgspec.Struct, rename="camel", kw_only=True):
    """One backup's record (its ``.json``); what listBackups shows."""

    backup_id: str
    sandbox_id: str
    dir: str
    name: str
    size_bytes: int
    created_at: float
    expires_at: float | None = None
    sha256: str = ""
    frozen: bool = False  # whether the room's other runs were frozen for the copy
    excludes: list[str] = []

    def wire(self) -> dict[str, object]:
        out: dict[str, object] = {
            "backupId": self.backup_id, "sandboxId": self.sandbox_id, "dir": self.dir,
            "name": self.name, "sizeBytes": self.size_bytes, "createdAt": iso(self.created_at),
            "sha256": self.sha256}
        if self.expires_at is not None:
            out["expiresAt"] = iso(self.expires_at)
        return out


@dataclass
class Archive:
    """A finished archive: an open, unlinked (or not yet linked) file, read from offset 0."""

    fd: int
    size: int
    sha256: str
    frozen: bool
    pause_ms: float
    #: its temp name in the uid's directory until ``Store.commit`` renames it (or close removes
    #: it; the start-up sweep removes what a crash left)
    path: str | None = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None


_locks: dict[tuple[str, int], asyncio.Lock] = {}


def _uid_lock(state_dir: str, uid: int) -> asyncio.Lock:
    return _locks.setdefault((state_dir, uid), asyncio.Lock())


# --- validation ------------------------------------------------------------------------------


def check_dir(path: str | None, field: str = "dir") -> str:
    """An absolute, normalised directory of the room (default /workspace); never ``/``."""
    if path is None:
        return "/workspace"
    check_path(path, field)
    norm = posixpath.normpath(path if path.startswith("/") else f"/workspace/{path}")
    if norm in ("/", "//"):
        raise errors.ValidationError(f"{field} must be a directory below /, not /", field=field)
    return norm


def check_excludes(excludes: list[str] | None) -> list[str]:
    out = list(excludes or [])
    if len(out) > MAX_EXCLUDES:
        raise errors.ValidationError(f"at most {MAX_EXCLUDES} excludes", field="excludes")
    for g in out:
        if not g or len(g) > 4096 or "\x00" in g or g.startswith("-"):
            raise errors.ValidationError(f"invalid exclude pattern {g[:100]!r}",
                                         field="excludes", pattern=g[:100])
    return out


def check_backup_id(backup_id: str) -> str:
    if not BACKUP_ID.match(backup_id):
        raise errors.BackupNotFound(f"backup {backup_id[:80]!r} not found",
                                    backupId=backup_id[:80])
    return backup_id


# --- the store -------------------------------------------------------------------------------


class Store:
    """Backups of every uid under ``<state_dir>/backups`` (no state of its own in memory)."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.root = os.path.join(state_dir, "backups")

    def dir(self, uid: int) -> str:
        path = os.path.join(self.root, str(uid))
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def _paths(self, uid: int, backup_id: str) -> tuple[str, str]:
        base = os.path.join(self.dir(uid), backup_id)
        return base + ".tgz", base + ".json"

    def tmpfile(self, uid: int) -> int:
        """An unlinked file in the uid's directory (nothing is left of it after a crash)."""
        return os.open(self.dir(uid), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)

    def namedtmp(self, uid: int) -> tuple[int, str]:
        """A new ``.tmp`` file of the uid's: what an archive is written to before it is renamed
        into place (an O_TMPFILE cannot be linked by an unprivileged daemon: linkat through
        /proc/self/fd answers EXDEV here, AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH)."""
        path = os.path.join(self.dir(uid), f".{secrets.token_hex(8)}.tgz.tmp")
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600), path

    def records(self, uid: int, now: float | None = None) -> list[BackupMeta]:
        """The uid's backups, oldest first; expired ones lose their archive here."""
        now = time.time() if now is None else now
        out: list[BackupMeta] = []
        try:
            names = os.listdir(self.dir(uid))
        except OSError:
            return out
        for name in sorted(names):
            if not name.endswith(".json") or not BACKUP_ID.match(name[:-5]):
                continue
            path = os.path.join(self.root, str(uid), name)
            try:
                with open(path, "rb") as f:
                    meta = msgspec.json.decode(f.read(), type=BackupMeta)
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                log.warning("unreadable backup record %s: skipped", name)
                continue
            if meta.expires_at is not None and meta.expires_at <= now:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path[:-5] + ".tgz")
                if now - meta.expires_at > EXPIRED_RECORD_S:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            out.append(meta)
        out.sort(key=lambda m: (m.created_at, m.backup_id))
        return out

    def live(self, uid: int) -> list[BackupMeta]:
        now = time.time()
        return [m for m in self.records(uid, now) if m.expires_at is None or m.expires_at > now]

    def usage(self, uid: int) -> int:
        return sum(m.size_bytes for m in self.live(uid))

    def get(self, uid: int, backup_id: str) -> tuple[BackupMeta, str]:
        """The record and archive path; BACKUP_NOT_FOUND / BACKUP_EXPIRED."""
        check_backup_id(backup_id)
        for meta in self.records(uid):
            if meta.backup_id != backup_id:
                continue
            if meta.expires_at is not None and meta.expires_at <= time.time():
                raise errors.BackupExpired(f"backup {backup_id} expired at "
                                           f"{iso(meta.expires_at)}", backupId=backup_id,
                                           expiresAt=iso(meta.expires_at))
            archive, _ = self._paths(uid, backup_id)
            if not os.path.exists(archive):
                break
            return meta, archive
        raise errors.BackupNotFound(f"backup {backup_id} not found", backupId=backup_id)

    def commit(self, uid: int, meta: BackupMeta, arc: Archive) -> None:
        """Rename the finished archive into place, then write its record (each fsynced): the
        record's rename is what makes the backup exist."""
        archive, record = self._paths(uid, meta.backup_id)
        publish(arc, archive, record, msgspec.json.encode(meta))

    def delete(self, uid: int, backup_id: str) -> bool:
        check_backup_id(backup_id)
        archive, record = self._paths(uid, backup_id)
        found = os.path.exists(record)
        # The record first: a crash between the two leaves an unlisted archive, swept below.
        for p in (record, archive):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        return found

    def sweep(self) -> int:
        """At start-up: archives without a record and stray temp records (a crash mid-commit)."""
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for uid in os.listdir(self.root):
                d = os.path.join(self.root, uid)
                with contextlib.suppress(OSError):
                    names = set(os.listdir(d))
                    for name in names:
                        stray = name.endswith(".tmp") or (
                            name.endswith(".tgz") and name[:-4] + ".json" not in names)
                        if stray:
                            with contextlib.suppress(OSError):
                                os.unlink(os.path.join(d, name))
                                removed += 1
        return removed


def publish(arc: Archive, archive: str, record: str, data: bytes) -> None:
    """Rename the finished archive to ``archive``, then write its ``record`` (each fsynced,
    then the directory): the record's rename is what makes it exist; a failure removes both.
    Backups and stopped rooms alike (both live in the state dir: renames, never copies)."""
    assert arc.path is not None
    os.fsync(arc.fd)
    os.rename(arc.path, archive)
    arc.path = None
    tmp = record + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, record)
        dfd = os.open(os.path.dirname(record), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        for p in (tmp, archive):
            with contextlib.suppress(OSError):
                os.unlink(p)
        raise


# --- runs in the room ------------------------------------------------------------------------


async def _room_run(rooms: RoomManager, uid: int, room: Room, argv: list[str], *,
                    stdin_fd: int | None = None, stdout_fd: int | None = None,
                    file_size: int | None = None, timeout_ms: int = ARCHIVE_TIMEOUT_MS,
                    env: dict[str, str] | None = None) -> runs.RunResult:
    """One archiving run in ``room`` as its root, counted like any run (the run quotas)."""
    runs.check_run_quotas(rooms, room, uid)
    spec = runs.RunSpec(argv=argv, env={**runs.base_env("root"), "LC_ALL": "C",
                                        "SANDBOXD_STAGE": STAGE_PREFIX, **(env or {})},
                        cwd="/", user="root", wall_time_ms=timeout_ms,
                        output_bytes=64 * 1024, file_size_bytes=file_size,
                        stdin_fd=stdin_fd, stdout_fd=stdout_fd)
    room.active_runs += 1
    try:
        return await runs.run(room, spec)
    except JailError as err:
        raise await rooms.lost(room, err) from err
    finally:
        room.active_runs -= 1
        room.touch()


def _too_big(res: runs.RunResult) -> bool:
    return res.signal == "SIGXFSZ" or res.limit_exceeded in ("fileSize", "fsize")


def _no_space(res: runs.RunResult) -> bool:
    text = res.stderr.lower()
    # (a short write on a full tmpfs: tar says only "Wrote only 512 of 10240 bytes")
    return "no space left" in text or "disk quota" in text or "wrote only" in text


def _freeze_others(room: Room, frozen: bool,
                   cgroups: list[RunCgroup] | None = None) -> list[RunCgroup]:
    """Freeze the room's live runs (which ones it froze), or thaw ``cgroups``."""
    if not frozen:
        for cg in cgroups or []:
            try:
                cg.freeze(False)
            except Exception:
                log.warning("room %s: thawing a run failed", room.key, exc_info=True)
        return []
    done: list[RunCgroup] = []
    for cg in room.cgroup.live_runs():
        try:
            if cg.freeze(True):
                done.append(cg)
        except Exception:
            log.warning("room %s: freezing a run failed", room.key, exc_info=True)
    return done


async def archive(rooms: RoomManager, uid: int, room: Room, directory: str | None,
                  excludes: list[str], max_bytes: int, store: Store) -> Archive:
    """A consistent gzip'd tar of ``directory`` (None: the writable layer) of ``room``."""
    loop = asyncio.get_running_loop()
    raw = store.tmpfile(uid)
    out, out_path = -1, ""
    try:
        frozen = await loop.run_in_executor(None, _freeze_others, room, True)
        started = time.monotonic()
        try:
            if directory is None:
                argv = ["sh", "-c", _LAYER_SH, "sh", *LAYER_DIRS]
            else:
                argv = ["sh", "-c", _ARCHIVE_SH, "sh", directory,
                        *[f"--exclude={g}" for g in excludes]]
            cap = room.options.limits.disk_bytes + TAR_SLACK
            res = await _room_run(rooms, uid, room, argv, stdout_fd=raw, file_size=cap)
        finally:
            pause_ms = (time.monotonic() - started) * 1000
            await loop.run_in_executor(None, _freeze_others, room, False, frozen)
        # tar: 1 = "a file changed as we read it" (only what nothing froze: the init's writes)
        if res.status == "TO":
            raise errors.SandboxError("archiving timed out", sandboxId=room.id)
        if res.exit_code in (66, 67):
            raise errors.FileNotFound(res.stderr.strip().removeprefix("sandboxd: "),
                                      path=directory)
        if res.exit_code not in (0, 1) or _too_big(res):
            raise errors.InternalError(f"tar failed in the room: {res.stderr.strip()[-500:]}",
                                       sandboxId=room.id)
        os.lseek(raw, 0, os.SEEK_SET)
        out, out_path = store.namedtmp(uid)
        res = await _room_run(rooms, uid, room, ["gzip", "-1", "-c", "-n"], stdin_fd=raw,
                              stdout_fd=out, file_size=max_bytes)
        if _too_big(res):
            raise errors.QuotaExceeded(f"the archive is larger than the maximum backup size "
                                       f"({max_bytes} bytes)", limit=max_bytes,
                                       scope="maxBackupBytes")
        if res.exit_code != 0:
            raise errors.InternalError(f"gzip failed in the room: {res.stderr.strip()[-500:]}",
                                       sandboxId=room.id)
        size, digest = await loop.run_in_executor(None, _digest, out)
        result = Archive(out, size, digest, bool(frozen), pause_ms, out_path)
        out = -1
        return result
    finally:
        os.close(raw)
        if out >= 0:
            os.close(out)
            with contextlib.suppress(OSError):
                os.unlink(out_path)


def _digest(fd: int) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
        size += len(chunk)
    os.lseek(fd, 0, os.SEEK_SET)
    return size, h.hexdigest()


async def unpack(rooms: RoomManager, uid: int, room: Room, directory: str | None,
                 src_fd: int) -> None:
    """Replace ``directory`` (None: unpack the layer at / of a fresh room) with the gzip'd tar
    ``src_fd`` holds; on failure the directory is as it was."""
    os.lseek(src_fd, 0, os.SEEK_SET)
    if directory is None:
        argv = ["sh", "-c", _LAYER_RESTORE_SH, "sh", *LAYER_DIRS]
    else:
        argv = ["sh", "-c", _RESTORE_SH, "sh", directory]
    res = await _room_run(rooms, uid, room, argv, stdin_fd=src_fd)
    if res.exit_code == 0:
        return
    where = directory or "/"
    detail = res.stderr.strip()[-1000:]
    if res.status == "TO":
        raise errors.SandboxError(f"unpacking into {where} timed out", sandboxId=room.id)
    if _no_space(res):
        raise errors.NoSpace(f"the archive does not fit in the sandbox's disk ({where} is "
                             "unchanged)", path=where, stderr=detail)
    if res.exit_code in (66, 67, 68):
        raise errors.ValidationError(detail.removeprefix("sandboxd: ") or "bad target dir",
                                     field="dir", dir=where)
    said = [ln for ln in detail.splitlines() if "Exiting with failure status" not in ln]
    raise errors.InvalidArchive(f"the archive was refused ({where} is unchanged): "
                                f"{said[0] if said else 'tar failed'}", path=where,
                                stderr=detail)


# --- the operations --------------------------------------------------------------------------


def _new_id() -> str:
    return "bk-" + secrets.token_hex(8)


async def create_backup(rooms: RoomManager, uid: int, sandbox_id: str, directory: str | None,
                        name: str | None, excludes: list[str] | None,
                        ttl_seconds: int | None) -> BackupMeta:
    cfg = rooms.config
    d = check_dir(directory)
    ex = check_excludes(excludes)
    if name is not None and (len(name) > MAX_NAME or "\x00" in name):
        raise errors.ValidationError(f"name must be at most {MAX_NAME} characters",
                                     field="name")
    if ttl_seconds is not None and cfg.max_backup_ttl_s and ttl_seconds > cfg.max_backup_ttl_s:
        raise errors.ValidationError(f"ttlSeconds above the maximum ({cfg.max_backup_ttl_s})",
                                     field="ttlSeconds", limit=cfg.max_backup_ttl_s)
    store = Store(cfg.state_dir)
    room = await rooms.get_or_create(uid, sandbox_id)
    async with _uid_lock(cfg.state_dir, uid):
        used = store.usage(uid) + stopped_usage(cfg.state_dir, uid)
        quota = cfg.max_backup_bytes_per_uid
        if not rooms.is_admin(uid) and used >= quota:
            raise errors.QuotaExceeded("backup storage quota reached", limit=quota,
                                       used=used, scope="uid")
        arc = await archive(rooms, uid, room, d, ex, cfg.max_backup_bytes, store)
        try:
            if not rooms.is_admin(uid) and used + arc.size > quota:
                raise errors.QuotaExceeded("backup storage quota reached", limit=quota,
                                           used=used, needed=arc.size, scope="uid")
            now = time.time()
            meta = BackupMeta(backup_id=_new_id(), sandbox_id=sandbox_id, dir=d,
                              name=name or "", size_bytes=arc.size, created_at=now,
                              expires_at=now + ttl_seconds if ttl_seconds else None,
                              sha256=arc.sha256, frozen=arc.frozen, excludes=ex)
            await asyncio.get_running_loop().run_in_executor(None, store.commit, uid, meta, arc)
        finally:
            arc.close()
    log.info("backup %s of %s:%s: %d bytes, pause %.1f ms", meta.backup_id, sandbox_id, d,
             meta.size_bytes, arc.pause_ms)
    return meta


async def restore_backup(rooms: RoomManager, uid: int, sandbox_id: str, backup_id: str,
                         directory: str | None) -> BackupMeta:
    store = Store(rooms.config.state_dir)
    meta, path = store.get(uid, backup_id)
    d = check_dir(directory) if directory is not None else meta.dir
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        room = await rooms.get_or_create(uid, sandbox_id)
        await unpack(rooms, uid, room, d, fd)
    finally:
        os.close(fd)
    return msgspec.structs.replace(meta, dir=d)


async def fork_sandbox(rooms: RoomManager, uid: int, sandbox_id: str,
                       new_sandbox_id: str) -> Room:
    cfg = rooms.config
    if new_sandbox_id == sandbox_id or (uid, new_sandbox_id) in rooms.rooms:
        raise errors.SandboxExists(f"sandbox {new_sandbox_id} already exists",
                                   sandboxId=new_sandbox_id)
    src = rooms.get(uid, sandbox_id)
    store = Store(cfg.state_dir)
    arc = await archive(rooms, uid, src, None, [], cfg.max_backup_bytes, store)
    try:
        if (uid, new_sandbox_id) in rooms.rooms:
            raise errors.SandboxExists(f"sandbox {new_sandbox_id} already exists",
                                       sandboxId=new_sandbox_id)
        new = await rooms.get_or_create(uid, new_sandbox_id, src.options_wire(), explicit=True)
        try:
            await unpack(rooms, uid, new, None, arc.fd)
        except BaseException:
            with contextlib.suppress(Exception):
                await rooms.destroy(uid, new_sandbox_id)
            raise
    finally:
        arc.close()
    return new


async def export_sandbox(rooms: RoomManager, uid: int, sandbox_id: str, directory: str | None,
                         excludes: list[str] | None,
                         send: Callable[[bytes, int], object]) -> tuple[str, int, str, int]:
    """Archive ``directory`` and hand it to ``send(chunk, offset)`` (awaited if it returns an
    awaitable); returns (dir, size, sha256, chunks)."""
    cfg = rooms.config
    d = check_dir(directory)
    ex = check_excludes(excludes)
    room = await rooms.get_or_create(uid, sandbox_id)
    store = Store(cfg.state_dir)
    arc = await archive(rooms, uid, room, d, ex, cfg.max_backup_bytes, store)
    loop = asyncio.get_running_loop()
    chunks = 0
    try:
        offset = 0
        while True:
            chunk = await loop.run_in_executor(None, os.pread, arc.fd, EXPORT_CHUNK, offset)
            if not chunk:
                break
            sent = send(chunk, offset)
            if asyncio.iscoroutine(sent) or isinstance(sent, asyncio.Future):
                await sent
            offset += len(chunk)
            chunks += 1
    finally:
        arc.close()
    return d, arc.size, arc.sha256, chunks


EXPORT_CHUNK = 1024 * 1024


class Imports:
    """Archives being uploaded by ``importSandbox`` chunks: one unlinked file per (uid, room),
    bounded by the maximum backup size, dropped with the connection's last chunk or the room."""

    def __init__(self) -> None:
        self.parts: dict[tuple[int, str], tuple[int, int]] = {}  # -> (fd, size)

    def drop(self, key: tuple[int, str]) -> None:
        got = self.parts.pop(key, None)
        if got is not None:
            with contextlib.suppress(OSError):
                os.close(got[0])


IMPORTS = Imports()
MAX_IMPORTS_PER_UID = 4


async def import_sandbox(rooms: RoomManager, uid: int, sandbox_id: str, directory: str | None,
                         data: bytes, append: bool, final: bool) -> tuple[str, int, str]:
    cfg = rooms.config
    d = check_dir(directory)
    store = Store(cfg.state_dir)
    key = (uid, sandbox_id)
    if not append:
        IMPORTS.drop(key)
        mine = sum(1 for (owner, _) in IMPORTS.parts if owner == uid)
        if mine >= MAX_IMPORTS_PER_UID and not rooms.is_admin(uid):
            raise errors.QuotaExceeded("too many imports in progress for this user",
                                       limit=MAX_IMPORTS_PER_UID, scope="uid")
        IMPORTS.parts[key] = (store.tmpfile(uid), 0)
    got = IMPORTS.parts.get(key)
    if got is None:
        raise errors.ValidationError("append: no import in progress for this sandbox (send the "
                                     "first chunk with append false)", field="append")
    fd, size = got
    if size + len(data) > cfg.max_backup_bytes:
        IMPORTS.drop(key)
        raise errors.QuotaExceeded(f"the archive is larger than the maximum backup size "
                                   f"({cfg.max_backup_bytes} bytes)",
                                   limit=cfg.max_backup_bytes, scope="maxBackupBytes")
    try:
        os.pwrite(fd, data, size)
    except OSError:
        IMPORTS.drop(key)
        raise
    IMPORTS.parts[key] = (fd, size + len(data))
    if not final:
        return d, size + len(data), ""
    IMPORTS.parts.pop(key, None)
    try:
        total, digest = await asyncio.get_running_loop().run_in_executor(None, _digest, fd)
        room = await rooms.get_or_create(uid, sandbox_id)
        await unpack(rooms, uid, room, d, fd)
    finally:
        os.close(fd)
    return d, total, digest


# --- sleep: onIdle "snapshot" ----------------------------------------------------------------


class StoppedRoom(msgspec.Struct, rename="camel", kw_only=True):
    """A room put to sleep: its options and its saved writable layer (``.tgz`` beside it)."""

    sandbox_id: str
    options: dict[str, object]
    size_bytes: int
    created_at: float
    stopped_at: float
    incarnation: int = 1


def stopped_usage(state_dir: str, uid: int) -> int:
    return sum(r.size_bytes for r in Sleeper.records_of(state_dir, uid))


class Sleeper:
    """Saves idle rooms with ``onIdle: "snapshot"`` under ``<state_dir>/stopped/<uid>/`` and
    wakes them on the next call on their id (``rooms.RoomManager.sleeper``). Records are written
    like backups (archive renamed into place, then the record), so a crash loses nothing saved;
    they survive daemon restarts. A stopped room counts against its owner's storage quota."""

    def __init__(self, rooms: RoomManager) -> None:
        self.rooms = rooms
        self.root = os.path.join(rooms.config.state_dir, "stopped")
        self._locks: dict[tuple[int, str], asyncio.Lock] = {}

    @staticmethod
    def records_of(state_dir: str, uid: int) -> list[StoppedRoom]:
        d = os.path.join(state_dir, "stopped", str(uid))
        out: list[StoppedRoom] = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(d)):
                if name.endswith(".json"):
                    with contextlib.suppress(OSError, msgspec.DecodeError,
                                             msgspec.ValidationError), \
                            open(os.path.join(d, name), "rb") as f:
                        out.append(msgspec.json.decode(f.read(), type=StoppedRoom))
        return out

    def _base(self, uid: int, room_id: str) -> str:
        name = hashlib.sha256(room_id.encode()).hexdigest()[:32]
        return os.path.join(self.root, str(uid), name)

    def record(self, uid: int, room_id: str) -> StoppedRoom | None:
        try:
            with open(self._base(uid, room_id) + ".json", "rb") as f:
                return msgspec.json.decode(f.read(), type=StoppedRoom)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    def stopped(self, uid: int, room_id: str) -> bool:
        return os.path.exists(self._base(uid, room_id) + ".json")

    def waking(self, uid: int, room_id: str) -> bool:
        lock = self._locks.get((uid, room_id))
        return lock is not None and lock.locked()

    def list(self, uid: int) -> list[StoppedRoom]:
        return self.records_of(self.rooms.config.state_dir, uid)

    def forget(self, uid: int, room_id: str) -> bool:
        base = self._base(uid, room_id)
        found = os.path.exists(base + ".json")
        for suffix in (".json", ".tgz"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(base + suffix)
        return found

    async def sleep(self, room: Room) -> bool:
        cfg = self.rooms.config
        uid = room.owner
        store = Store(cfg.state_dir)
        arc = await archive(self.rooms, uid, room, None, [], cfg.max_backup_bytes, store)
        try:
            used = store.usage(uid) + stopped_usage(cfg.state_dir, uid)
            if not self.rooms.is_admin(uid) and used + arc.size > cfg.max_backup_bytes_per_uid:
                log.warning("room %s: not put to sleep, its owner's storage quota is full "
                            "(%d + %d bytes); it keeps running", room.key, used, arc.size)
                return False
            rec = StoppedRoom(sandbox_id=room.id, options=room.options_wire(),
                              size_bytes=arc.size, created_at=room.created_at,
                              stopped_at=time.time(), incarnation=room.incarnation)
            await asyncio.get_running_loop().run_in_executor(None, self._commit, uid, rec, arc)
        finally:
            arc.close()
        log.info("room %s saved (%d bytes) and stopped", room.key, rec.size_bytes)
        return True

    def _commit(self, uid: int, rec: StoppedRoom, arc: Archive) -> None:
        base = self._base(uid, rec.sandbox_id)
        os.makedirs(os.path.dirname(base), mode=0o700, exist_ok=True)
        publish(arc, base + ".tgz", base + ".json", msgspec.json.encode(rec))

    async def wake(self, uid: int, room_id: str) -> None:
        lock = self._locks.setdefault((uid, room_id), asyncio.Lock())
        try:
            async with lock:
                rec = self.record(uid, room_id)
                if rec is None:
                    return
                base = self._base(uid, room_id)
                fd = os.open(base + ".tgz", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    room = await self.rooms.get_or_create(uid, room_id, rec.options,
                                                          explicit=True, waking=True)
                    try:
                        await unpack(self.rooms, uid, room, None, fd)
                    except BaseException:
                        # The saved layer stays: the next call tries again.
                        with contextlib.suppress(Exception):
                            await self.rooms.destroy_live(uid, room_id)
                        raise
                finally:
                    os.close(fd)
                room.created_at = rec.created_at
                room.incarnation = rec.incarnation
                for suffix in (".json", ".tgz"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(base + suffix)
                log.info("room %s woken from its saved layer", room.key)
        finally:
            if not lock.locked() and self._locks.get((uid, room_id)) is lock:
                del self._locks[(uid, room_id)]
