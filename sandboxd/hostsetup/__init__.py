"""Host preparation (``sandboxctl setup``, as root) and diagnosis (``sandboxctl doctor``).

``setup(user)`` makes the host ready for USER to run sandboxd without root, and is idempotent:

1. subordinate ids: one range of SUBID_COUNT ids in /etc/subuid and /etc/subgid (first fit from
   SUB_UID_MIN=100000, never overlapping another entry), so rooms' root maps to ids that are not
   the daemon's own and each room gets a slice of its own (newuidmap/newgidmap then let USER map
   them; see jail/user.py). :func:`ensure_subids` is the only code that sizes and places it:
   scripts/install.sh calls it too, so one set-up gives one range;
2. cgroups: :func:`sandboxd.hostsetup.cgroups.delegate` hands USER a subtree (v2) or
   per-controller directories (v1);
3. the state directory (default ``~USER/.local/state/sandboxd``, 0700, owned by USER);
4. the socket's runtime directory when ``/run/user/UID`` is absent: the daemon then listens under
   ``/tmp/sandboxd-UID``, which we create (0700, USER) so that nobody else can squat it, plus a
   tmpfiles.d line that recreates it at boot.

Root creates and chowns directories in paths USER controls (its home, /tmp), the classic set-up for
a symlink attack: ``~/.local/state -> /etc`` would make a naive ``chown -R`` hand /etc to USER.
So directories are walked one component at a time with O_NOFOLLOW, following only symlinks that
root owns in directories only root can write (``/home -> /usr/home``), and chowned by fd.

``doctor()`` diagnoses one user (:class:`Subject`): the one ``--user`` names, else the one the
daemon at the socket runs as (its SO_PEERCRED uid when it answers ``ping``), else the caller. It
forks short-lived probe children (as that user, when root runs it) for what can only be known by
trying: unsharing a user namespace, mounting overlayfs inside one. Every check says what is
missing and what that costs; host-wide checks (scope "host": the kernel, the cgroup2 mount,
probes only root can run as another user) are root's to fix and are reported apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import grp
import json
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

from .. import config, errors, kernel, protocol

# The one size of a daemon user's subordinate range, given by both `sandboxctl setup` and
# scripts/install.sh (issue 22: they used to give 1 Mi and 64 Ki ids, two ranges for one user).
# Every room takes a slice of SLICE_IDS ids (jail/user.py SLICE_SIZE; a unit test holds the two
# equal) so that each room is a different host user; the Performance issue (18) asks for at least
# 1,000 rooms with the default set-up, where 1 Mi ids stopped at 256.
ROOM_SLICES = 1024
SLICE_IDS = 4096
SUBID_COUNT = ROOM_SLICES * SLICE_IDS  # 4,194,304 ids
SETUP_SUBID_COUNT = SUBID_COUNT  # the name tests and older callers use
SUB_ID_MIN = 100000  # login.defs SUB_UID_MIN / SUB_GID_MIN defaults
SUB_ID_MAX = 600100000
SUBUID = "/etc/subuid"
SUBGID = "/etc/subgid"
TMPFILES_DIR = "/etc/tmpfiles.d"


class SetupError(errors.SandboxError):
    """setup could not complete a step (the message names it); re-run after fixing."""

    code = "HOST_SETUP_FAILED"


# --- subordinate ids ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SubIdRange:
    owner: str  # a user name or a numeric uid, as written in the file
    start: int
    count: int

    @property
    def end(self) -> int:
        """One past the last id."""
        return self.start + self.count


def parse_subids(text: str) -> list[SubIdRange]:
    """Entries of an /etc/subuid-format text; comments and malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) != 3 or line.lstrip().startswith("#"):
            continue
        try:
            start, count = int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if start >= 0 and count > 0:
            out.append(SubIdRange(fields[0], start, count))
    return out


def read_subids(path: str) -> list[SubIdRange]:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_subids(f.read())
    except FileNotFoundError:
        return []


def ranges_of(entries: Iterable[SubIdRange], user: str, uid: int) -> list[SubIdRange]:
    """The user's entries (by name, or by uid as newuidmap also accepts)."""
    return [e for e in entries if e.owner in (user, str(uid))]


def allocate(entries: Iterable[SubIdRange], count: int = SUBID_COUNT, lo: int = SUB_ID_MIN,
             hi: int = SUB_ID_MAX) -> int:
    """First fit: the lowest start >= lo where [start, start+count) overlaps no entry and ends by
    hi (the same policy as useradd)."""
    start = lo
    for e in sorted(entries, key=lambda e: e.start):
        if e.end <= start:
            continue
        if e.start >= start + count:
            break
        start = e.end
    if start + count > hi:
        raise SetupError(f"no free range of {count} subordinate ids between {lo} and {hi}")
    return start


def _append_entry(path: str, line: str) -> None:
    """Append one line by writing a copy and renaming it over the original (readers never see a
    half-written file), keeping the file's mode and owner."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        text, st = "", None
    if text and not text.endswith("\n"):
        text += "\n"
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".sandboxd-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + line + "\n")
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode) if st else 0o644)
            if st is not None:
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def ensure_subids(user: str, uid: int, *, subuid_path: str | None = None,
                  subgid_path: str | None = None, count: int = SUBID_COUNT,
                  use_usermod: bool | None = None) -> list[str]:
    """Give ``user`` ``count`` subordinate uids and gids unless it already has that many: the
    one owner of the daemon user's range and its size (``setup`` and scripts/install.sh both
    call it with the default ``count``).

    When both are missing, one start free in both files is chosen, so uid and gid ranges match.
    ``usermod --add-subuids`` (which takes shadow's locks) is used on /etc/subuid and /etc/subgid
    when present; otherwise, and for other paths, the file is edited directly. The paths default
    to SUBUID and SUBGID as they are when called.
    """
    subuid_path = subuid_path or SUBUID
    subgid_path = subgid_path or SUBGID
    if use_usermod is None:
        use_usermod = (subuid_path, subgid_path) == ("/etc/subuid", "/etc/subgid") and bool(
            shutil.which("usermod"))
    files = {"uid": (subuid_path, read_subids(subuid_path)),
             "gid": (subgid_path, read_subids(subgid_path))}
    missing = []
    actions = []
    for kind, (path, entries) in files.items():
        mine = ranges_of(entries, user, uid)
        if any(e.count >= count for e in mine):
            have = next(e for e in mine if e.count >= count)
            actions.append(f"subordinate {kind}s: {user} already has {have.start}-"
                           f"{have.end - 1} in {path}")
        else:
            if mine:
                best = max(mine, key=lambda e: e.count)
                actions.append(f"warning: {user}'s largest subordinate {kind} range in {path} "
                               f"({best.start}-{best.end - 1}) holds fewer than {count} ids; "
                               f"adding one that does (the daemon uses the largest)")
            missing.append(kind)
    if not missing:
        return actions
    start = allocate([e for k in missing for e in files[k][1]], count)
    for kind in missing:
        path = files[kind][0]
        if use_usermod:
            flag = "--add-subuids" if kind == "uid" else "--add-subgids"
            res = subprocess.run(["usermod", flag, f"{start}-{start + count - 1}", user],
                                 capture_output=True, text=True, check=False, timeout=30)
            if res.returncode != 0:
                raise SetupError(f"usermod {flag} {start}-{start + count - 1} {user} failed: "
                                 f"{res.stderr.strip() or res.returncode}")
        else:
            try:
                _append_entry(path, f"{user}:{start}:{count}")
            except OSError as err:
                raise SetupError(f"cannot add {user}:{start}:{count} to {path}: {err}") from err
        actions.append(f"subordinate {kind}s: gave {user} {start}-{start + count - 1} in {path}")
    return actions


# --- directories, safely -----------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _trusted_link(name: str, dir_fd: int) -> bool:
    """A symlink root may follow: owned by root, in a directory only root can write."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    parent = os.fstat(dir_fd)
    return (stat.S_ISLNK(st.st_mode) and st.st_uid == 0 and parent.st_uid == 0
            and not parent.st_mode & 0o022)


def ensure_dir(path: str, uid: int, gid: int, *, mode: int = 0o700, user_home: str | None = None,
               _depth: int = 0) -> str:
    """Create ``path`` if needed and make it a ``mode`` directory owned by uid:gid, without ever
    following a symlink someone other than root could have planted. Directories created on the
    way below ``user_home`` belong to the user too (as if it had run ``mkdir -p``); elsewhere they
    are root's, 0755. Returns what was done, as one sentence.

    An existing target owned by another non-root user is refused: it may be a squatter's.
    """
    if _depth > 40:
        raise SetupError(f"too many symbolic links resolving {path}")
    path = os.path.normpath(os.path.abspath(path))
    home = os.path.realpath(user_home) if user_home else None
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", _DIR_FLAGS)
    cur = "/"
    created = False
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            nxt = os.path.join(cur, name)
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                below_home = home is not None and nxt.startswith(home + "/")
                mine = last or below_home
                os.mkdir(name, 0o700 if mine else 0o755, dir_fd=fd)
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                if mine:
                    os.fchown(nfd, uid, gid)
                created = created or last
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                if not _trusted_link(name, fd):
                    kind = ("a symlink" if stat.S_ISLNK(os.stat(name, dir_fd=fd,
                                                                follow_symlinks=False).st_mode)
                            else "not a directory")
                    raise SetupError(f"refusing {path}: {nxt} is {kind} that root must not "
                                     f"follow or replace; remove it and re-run") from err
                target = os.readlink(name, dir_fd=fd)
                rest = os.path.join(os.path.join(cur, target), *parts[i + 1:])
                return ensure_dir(rest, uid, gid, mode=mode, user_home=user_home,
                                  _depth=_depth + 1)
            os.close(fd)
            fd, cur = nfd, nxt
        st = os.fstat(fd)
        if st.st_uid not in (0, uid):
            raise SetupError(f"{path} exists and belongs to uid {st.st_uid}, not {uid}: refusing "
                             f"to take it over (remove it if it is stale)")
        changed = []
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
            changed.append(f"owner {uid}:{gid}")
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
            changed.append(f"mode {mode:o}")
        if created:
            return f"created {path} (mode {mode:o}, owner {uid}:{gid})"
        if changed:
            return f"fixed {path}: {', '.join(changed)}"
        return f"{path} already exists (mode {mode:o}, owner {uid}:{gid})"
    finally:
        os.close(fd)


def _write_if_changed(path: str, text: str) -> bool:
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
        if f.read() == text:
            return False
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


# --- setup -------------------------------------------------------------------------------------


def _delegate_cgroups(user: str, uid: int, gid: int) -> list[str]:
    from . import cgroups  # only setup needs it: the CLI's other commands stay cheap

    try:
        lines = [f"cgroups: {line}" for line in cgroups.delegate(user, uid, gid)]
    except OSError as err:
        raise SetupError(f"cgroup delegation for {user} failed: {err}") from err
    return lines + [f"cgroups: {line}" for line in cgroups.favor_dynmods()]


def setup(user: str, state_dir: str | None = None, *, subuid_path: str | None = None,
          subgid_path: str | None = None, tmp_root: str = "/tmp", run_user_root: str = "/run/user",
          tmpfiles_dir: str | None = TMPFILES_DIR, cgroups: bool = True) -> list[str]:
    """Prepare the host for ``user`` to run sandboxd rootless (see the module docstring).
    Must run as root; returns one line per thing checked or done."""
    if os.geteuid() != 0:
        raise SetupError("sandboxctl setup must run as root (it edits /etc/subuid and hands "
                         "cgroups to the user)")
    try:
        pw = pwd.getpwnam(user)
    except KeyError as err:
        raise SetupError(f"no such user: {user}", user=user) from err
    if pw.pw_uid == 0:
        raise SetupError("root needs no set-up: sandboxd run as root maps ids directly")
    uid, gid, home = pw.pw_uid, pw.pw_gid, pw.pw_dir
    actions = ensure_subids(user, uid, subuid_path=subuid_path, subgid_path=subgid_path)
    if cgroups:
        actions += _delegate_cgroups(user, uid, gid)
    target = state_dir or os.path.join(home, ".local", "state", "sandboxd")
    try:
        actions.append("state dir: " + ensure_dir(target, uid, gid, user_home=home))
    except OSError as err:
        raise SetupError(f"cannot prepare the state dir {target}: {err}") from err
    runtime = os.path.join(run_user_root, str(uid))
    if os.path.isdir(runtime):
        actions.append(f"runtime dir: {runtime} exists (systemd-logind removes it at logout "
                       f"unless `loginctl enable-linger {user}`)")
    else:
        fallback = os.path.join(tmp_root, f"sandboxd-{uid}")
        try:
            actions.append("runtime dir: " + ensure_dir(fallback, uid, gid))
        except OSError as err:
            raise SetupError(f"cannot prepare the runtime dir {fallback}: {err}") from err
        if tmpfiles_dir and os.path.isdir(tmpfiles_dir):
            group = grp.getgrgid(gid).gr_name
            conf = os.path.join(tmpfiles_dir, f"sandboxd-{user}.conf")
            line = (f"# sandboxctl setup: {user}'s sandboxd socket directory (no /run/user/{uid})\n"
                    f"d {fallback} 0700 {user} {group} -\n")
            if _write_if_changed(conf, line):
                actions.append(f"runtime dir: wrote {conf} to recreate {fallback} at boot")
    return actions


# --- doctor ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    cost: str = ""  # what sandboxd loses when this check fails
    essential: bool = False  # rooms cannot run at all without it
    # "user": about the user the report is for (the daemon's); "host": host-wide, root's to fix
    # (the kernel, the cgroup2 mount options, probes only root can run as another user).
    scope: str = "user"
    skipped: bool = False  # not run (only root can); neither a pass nor a failure

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _probe(fn: Callable[[], None], ids: tuple[int, int] | None = None,
           timeout: float = 10.0) -> str | None:
    """Run ``fn`` in a forked child (as uid/gid ``ids`` if given). None if it returned; else
    what it raised, as text. The child never returns into the caller's code."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 1
        try:
            os.close(r)
            if ids is not None:
                os.setgroups([])
                os.setgid(ids[1])
                os.setuid(ids[0])
                # Changing uid made us non-dumpable, which makes /proc/self/* root's: the
                # probe could not write its own uid_map. The real daemon never changes uid.
                import prctl

                prctl.set_dumpable(True)
            fn()
            status = 0
        except BaseException as err:  # noqa: BLE001 - reported to the parent as data
            with contextlib.suppress(BaseException):
                os.write(w, f"{type(err).__name__}: {err}".encode()[:4000])
        finally:
            os._exit(status)
    os.close(w)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 4096)
            if not chunk:
                break
            out += chunk
        else:
            os.kill(pid, signal.SIGKILL)
            out = b"probe timed out"
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0 and not out:
        return None
    return out.decode(errors="replace") or f"probe exited with status {status}"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _userns_probe() -> None:
    from ..jail import _syscalls

    _syscalls.unshare(_syscalls.CLONE_NEWUSER)


def _overlay_probe(scratch: str, lower: str) -> Callable[[], None]:
    def probe() -> None:
        from ..jail import _syscalls as sc

        uid, gid = os.geteuid(), os.getegid()
        sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
        # A single mapping needs setgroups denied first (CVE-2014-8989).
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1\n"),
                           ("gid_map", f"0 {gid} 1\n")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        sc.mount("tmpfs", scratch, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "size=1m,mode=0755")
        upper, work, merged = (os.path.join(scratch, d) for d in ("upper", "work", "merged"))
        for d in (upper, work, merged):
            os.mkdir(d)
        sc.mount("overlay", merged, "overlay", sc.MS_NOSUID | sc.MS_NODEV,
                 f"lowerdir={lower},upperdir={upper},workdir={work}")
        if not os.listdir(merged) and os.listdir(lower):
            raise OSError("overlay mounted but shows none of the lower layer")
        with open(os.path.join(merged, ".sandboxd-doctor"), "w") as f:
            f.write("ok")
    return probe


def _check_userns(ids: tuple[int, int] | None, who: str) -> Check:
    err = _probe(_userns_probe, ids)
    if err is None:
        return Check("user namespaces", True, f"{who} can create user namespaces",
                     essential=True)
    hints = []
    for knob, bad in (("/proc/sys/user/max_user_namespaces", "0"),
                      ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
                      ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1")):
        if _read(knob) == bad:
            hints.append(f"{knob} is {bad}")
    return Check("user namespaces", False,
                 f"{who} cannot unshare a user namespace: {err}"
                 + (f" ({'; '.join(hints)})" if hints else ""),
                 "rooms cannot be created at all (sandboxd is rootless: every room is a user "
                 "namespace)", essential=True)


def _check_overlay(ids: tuple[int, int] | None, who: str, rootfs: str) -> Check:
    lower = "/usr" if rootfs == "host" else rootfs
    scratch = tempfile.mkdtemp(prefix="sandboxd-doctor-")
    try:
        if ids is not None:
            os.chown(scratch, *ids)
        err = _probe(_overlay_probe(scratch, lower), ids)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(scratch)
    if err is None:
        return Check("overlayfs in a user namespace", True,
                     f"{who} can mount tmpfs and overlay (lower {lower}) in a user namespace",
                     essential=True)
    return Check("overlayfs in a user namespace", False, f"{who}: {err}",
                 "rooms cannot get a writable layer over the read-only runtime tree",
                 essential=True)


def _check_cgroups(user: str | None) -> list[Check]:
    cost = ("no memory, pids or CPU limits and no whole-tree kill: rooms fall back to rlimits "
            "and wall-clock kills (run `sandboxctl setup --user USER` as root)")
    from . import cgroups  # only doctor needs it: the CLI's other commands stay cheap

    try:
        # Each line is (check, ok, what it costs when missing).
        lines = cgroups.doctor_report(user=user) if user is not None else cgroups.doctor_report()
        return [Check(name if name.startswith("cgroup") else f"cgroups: {name}", ok,
                      "available" if ok else "unavailable", "" if ok else missing_cost)
                for name, ok, missing_cost in lines]
    except OSError as err:
        return [Check("cgroups", False, f"cgroup report failed: {err}", cost)]


def _helper_ok(name: str) -> tuple[bool, str]:
    path = shutil.which(name) or f"/usr/bin/{name}"
    try:
        st = os.stat(path)
    except OSError:
        return False, f"{name} not installed (package uidmap)"
    if st.st_uid == 0 and st.st_mode & stat.S_ISUID:
        return True, f"{path} setuid root"
    with contextlib.suppress(OSError):
        if os.getxattr(path, "security.capability"):
            return True, f"{path} has file capabilities"
    return False, f"{path} is neither setuid root nor file-capable"


def _check_subids(user: str, uid: int, subuid_path: str, subgid_path: str) -> Check:
    cost = ("rooms map a single id: a room's root is the daemon's own host uid, so an escape "
            "lands as that user, rooms are not different host users, and `user: sandbox` is "
            "refused")
    if uid == 0:
        return Check("subordinate ids", True, "root maps any ids directly; none needed")
    found = []
    for kind, path in (("uid", subuid_path), ("gid", subgid_path)):
        mine = [e for e in ranges_of(read_subids(path), user, uid) if e.count >= 2]
        if not mine:
            return Check("subordinate ids", False, f"{user} has no subordinate {kind}s in {path}",
                         cost + f" (fix: sandboxctl setup --user {user})")
        best = max(mine, key=lambda e: e.count)  # the range the daemon uses (jail/user.py)
        found.append(f"{kind}s {best.start}-{best.end - 1}")
    helpers = [_helper_ok("newuidmap"), _helper_ok("newgidmap")]
    if not all(ok for ok, _ in helpers):
        return Check("subordinate ids", False,
                     f"{user} has {', '.join(found)} but " + "; ".join(d for _, d in helpers),
                     cost)
    from ..jail.user import SLICE_SIZE

    slices = min(max(e.count for e in ranges_of(read_subids(p), user, uid))
                 for p in (subuid_path, subgid_path)) // SLICE_SIZE
    fewer = (f"; at most {slices} rooms at once: `sandboxctl setup --user {user}` adds a range "
             f"for {ROOM_SLICES}") if slices < ROOM_SLICES else ""
    return Check("subordinate ids", True, f"{user} has {', '.join(found)} ({slices} room slices "
                 f"of {SLICE_SIZE} ids: each room its own host users{fewer}); "
                 + "; ".join(d for _, d in helpers))


def _check_rootfs(rootfs: str) -> Check:
    if rootfs == "host":
        return Check("rootfs", False, "no runtime tree built; rooms will see a read-only view of "
                     "the host's /usr", "rooms get whatever toolchains the host has, and the "
                     "host's files are visible read-only (build one: rootfs/build.sh)")
    manifest = None
    for path in (rootfs.rstrip("/") + ".manifest.json",
                 os.path.join(rootfs, "etc", "sandboxd", "manifest.json")):
        text = _read(path)
        if text is not None:
            try:
                manifest = json.loads(text)
            except ValueError:
                return Check("rootfs", False, f"{rootfs}: unreadable manifest {path}",
                             "language versions cannot be reported")
            break
    if not isinstance(manifest, dict):
        return Check("rootfs", True, f"{rootfs} (no manifest)")
    langs = manifest.get("languages") or {}
    missing = sorted(k for k, v in langs.items() if not (isinstance(v, dict) and v.get("version")))
    detail = (f"{rootfs}: {manifest.get('os', '?')}, built {manifest.get('built', '?')}, "
              f"{len(langs) - len(missing)}/{len(langs)} toolchains")
    if missing:
        return Check("rootfs", False, detail + f"; without a version: {', '.join(missing)}",
                     f"runs in {', '.join(missing)} may fail")
    return Check("rootfs", True, detail)


def _check_daemon(subject: Subject) -> Check:
    cost = "nothing serves rooms yet: start sandboxd (as the user it was set up for)"
    result = subject.ping
    if result is None:
        return Check("daemon", False, subject.unreachable or f"no daemon at {subject.socket}",
                     cost)
    ids = (result.get("capabilities") or {}).get("idSlices") or {}
    where = f"sandboxd {result.get('version', '?')} answers at {subject.socket}"
    if subject.daemon_uid is not None and subject.daemon_uid != subject.uid:
        return Check("daemon", False, f"{where} but runs as uid {subject.daemon_uid}, not "
                     f"{subject.user}", f"this report is not about that daemon (try --user "
                     f"{_user_name(subject.daemon_uid)})")
    if ids.get("mode") == "single":
        return Check("daemon", False, f"{where}; id mapping: single ({ids.get('reason', '?')})",
                     str(ids.get("cost", "")))
    mapping = (f"; id mapping: subordinate, {ids.get('slicesFree', '?')}/{ids.get('slices', '?')}"
               f" room slices of {ids.get('sliceSize', '?')} ids free") if ids else ""
    backend = _daemon_backend(subject)
    limits = (result.get("capabilities") or {}).get("limits") or []
    cgroups = (f"; cgroup backend {backend}, limits: {', '.join(map(str, limits)) or 'none'}"
               if backend else "")
    return Check("daemon", True, where + mapping + cgroups)


def _user_socket(uid: int, run_user_root: str = "/run/user", tmp_root: str = "/tmp") -> str:
    """Where ``config.default_socket()`` puts the socket of a daemon run by ``uid``."""
    runtime = os.path.join(run_user_root, str(uid))
    if not os.path.isdir(runtime):
        runtime = os.path.join(tmp_root, f"sandboxd-{uid}")
    return os.path.join(runtime, "sandboxd", "sandboxd.sock")


def _check_kernel_features() -> list[Check]:
    """The interfaces newer than Debian 12's baseline that sandboxd uses (sandboxd.kernel)."""
    return [Check(f"kernel interface {f.name}", f.present,
                  f"present (since {f.since})" if f.present
                  else f"missing (since {f.since}){': ' + f.detail if f.detail else ''}",
                  cost=f.cost, essential=f.required, scope="host")
            for f in kernel.probe()]


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclasses.dataclass(frozen=True)
class Subject:
    """Whom ``doctor`` diagnoses, and why (issue 22: as root it diagnosed root, while the daemon
    that scripts/run.sh started runs as ``sandboxd``): the user ``--user`` names, else the user
    the daemon at the socket runs as (its SO_PEERCRED uid when it answers ``ping``), else the
    caller."""

    user: str
    uid: int
    gid: int
    socket: str  # the daemon's socket (asked, or where that user's daemon listens)
    why: str  # "--user" | "daemon" | "you"
    ping: protocol.PingResult | None = None  # the daemon's answer, when one answered
    daemon_uid: int | None = None  # the uid the answering daemon runs as
    unreachable: str = ""  # why no daemon answered

    @property
    def rootfs(self) -> str:
        """The daemon's rootfs when it told us; else where one would be for the caller."""
        caps = self.ping.get("capabilities") if self.ping is not None else None
        got = caps.get("rootfs") if caps is not None else None
        return str(got) if got else config.default_rootfs()

    def headline(self) -> str:
        """The first line of the report: which user and which daemon it is about."""
        who = f"sandboxctl doctor: user {self.user} (uid {self.uid}"
        if self.ping is not None and self.daemon_uid == self.uid:
            daemon = f"sandboxd {self.ping.get('version', '?')} at {self.socket}"
            how = {"daemon": f"the user {daemon} runs as",
                   "--user": f"as --user says; {daemon} runs as it"}.get(
                       self.why, f"you; {daemon} runs as you")
            return f"{who}), {how}"
        asked = ", as --user says" if self.why == "--user" else ", you"
        if self.ping is not None:
            return (f"{who}{asked}); the daemon at {self.socket} runs as "
                    f"{_user_name(self.daemon_uid or 0)} instead")
        hint = "" if self.why == "--user" else " (start it, or name its user with --user)"
        return f"{who}{asked}); no daemon answers at {self.socket}{hint}"


def _ping(socket: str) -> tuple[protocol.PingResult | None, int | None, str]:
    """(ping result, the daemon's uid, "") or (None, None, why not)."""
    from ..client import Client

    try:
        with Client(socket, timeout=2.0) as client:
            result = client.ping()
            return result, client.server_uid, ""
    except errors.SandboxError as err:
        return None, None, err.message


def find_subject(user: str | None = None, socket: str | None = None, *,
                 ping: bool = True) -> Subject:
    """Whom to diagnose (see :class:`Subject`); ``ping`` False asks no daemon."""
    me = os.geteuid()
    if user is not None:
        try:
            pw = pwd.getpwnam(user)
        except KeyError as err:
            raise errors.ValidationError(f"no such user: {user}", user=user) from err
        candidates = [socket] if socket else list(dict.fromkeys(
            [config.default_client_socket(), _user_socket(pw.pw_uid)]))
        subject = Subject(user, pw.pw_uid, pw.pw_gid, candidates[0], "--user")
        if not ping:
            return subject
        first: Subject | None = None
        for path in candidates:
            result, uid, why = _ping(path)
            found = dataclasses.replace(subject, socket=path, ping=result, daemon_uid=uid,
                                        unreachable=why)
            if result is not None and uid == pw.pw_uid:
                return found
            first = first or found
        return first or subject
    try:
        pw = pwd.getpwuid(me)
        name, gid = pw.pw_name, pw.pw_gid
    except KeyError:
        name, gid = str(me), os.getegid()
    path = socket or config.default_client_socket()
    you = Subject(name, me, gid, path, "you")
    if not ping:
        return you
    result, uid, why = _ping(path)
    if result is None:
        return dataclasses.replace(you, unreachable=why)
    if uid is not None and uid != me:
        try:
            dpw = pwd.getpwuid(uid)
            return Subject(dpw.pw_name, uid, dpw.pw_gid, path, "daemon", result, uid)
        except KeyError:
            return Subject(str(uid), uid, uid, path, "daemon", result, uid)
    return dataclasses.replace(you, ping=result, daemon_uid=uid)


HOST_CHECKS = ("kernel", "cgroup migrations fast", "cgroup2 mounted")
# Checks that only matter for the backend the answering daemon does not use.
_OTHER_BACKEND = {"v1": "cgroup2 delegated", "v2": "cgroup v1 "}


def _daemon_backend(subject: Subject) -> str | None:
    caps = subject.ping.get("capabilities") if subject.ping is not None else None
    cg = caps.get("cgroup") if caps is not None else None
    backend = cg.get("backend") if isinstance(cg, dict) else None
    return str(backend) if backend and subject.daemon_uid == subject.uid else None


def _check_egress() -> Check:
    from .. import egress
    ok, why = egress.available()
    return Check("egress", ok, egress.MECHANISM if ok else why, scope="host",
                 cost="" if ok else "rooms asking for a network option are refused "
                 "(LIMIT_UNAVAILABLE); without one they work as before")


def doctor(user: str | None = None, socket: str | None = None, *,
           subuid_path: str | None = None, subgid_path: str | None = None, daemon: bool = True,
           subject: Subject | None = None) -> list[Check]:
    """What this host offers the daemon's user (``subject``: by default :func:`find_subject`
    of ``user`` and ``socket``; ``daemon`` False asks no daemon and checks none). Checks of
    ``scope`` "host" are host-wide and root's to fix; the others are about the subject."""
    if subject is None:
        subject = find_subject(user, socket, ping=daemon)
    me = os.geteuid()
    ids = (subject.uid, subject.gid) if subject.uid != me else None
    who = subject.user if subject.uid else "root"
    rootfs = subject.rootfs
    checks = [Check("kernel", True, f"{os.uname().sysname} {os.uname().release}", scope="host"),
              *_check_kernel_features()]
    if ids is not None and me != 0:
        checks += [Check(name, True, f"not probed: only root can run the probe as "
                         f"{subject.user} (sudo sandboxctl doctor)", essential=True,
                         scope="host", skipped=True)
                   for name in ("user namespaces", "overlayfs in a user namespace")]
    else:
        checks += [_check_userns(ids, who), _check_overlay(ids, who, rootfs)]
    backend = _daemon_backend(subject)
    for c in _check_cgroups(subject.user if ids is not None else None):
        if c.name.startswith(HOST_CHECKS):
            c = dataclasses.replace(c, scope="host")
        elif not c.ok and backend and c.name.startswith(_OTHER_BACKEND.get(backend, "-")):
            # The probe looks at this process's cgroup; the daemon told us what it uses.
            c = dataclasses.replace(c, ok=True, skipped=True, cost="",
                                    detail=f"not needed: the daemon uses the {backend} backend")
        checks.append(c)
    checks += [_check_subids(subject.user, subject.uid, subuid_path or SUBUID,
                             subgid_path or SUBGID), _check_rootfs(rootfs), _check_egress()]
    if daemon:
        checks.append(_check_daemon(subject))
    return checks
