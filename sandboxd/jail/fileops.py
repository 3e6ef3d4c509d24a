"""File operations of the room init: every path of the file API is resolved here, inside the room.

Theory of operation. The init is PID 1 of the room, root of the room's user namespace, and after
``pivot_root`` its root directory *is* the room's root: no path it resolves can name a host file.
The daemon (host credentials) never opens a room path; it sends the path here and gets back an
**open file descriptor** (SCM_RIGHTS) for content, or a small reply for metadata operations
(the structs of ``messages.py``; the init's ``dispatch`` calls the function for each):

  OpenRead {path}                   -> Opened {path, size, mtime, mode}
                                       + [fd O_RDONLY of a regular file]        open_read
  Write    {path, size, append} + [pipe read end]
                                    -> Written {path, bytes_written} once ``size`` bytes were
                                       spliced from the pipe into a temporary file and renamed
                                       over the target (missing parents are created) FileWriter
  Exists   {path}                   -> Existence {path, exists, type}           exists
  Delete   {path}                   -> PathReply {path} (files and links; never directories)
  Rename   {src, dst, into}         -> Renamed {path, new_path} (``into``: moveFile semantics —
                                       an existing directory as destination receives the source)
  Mkdir    {path, recursive}        -> PathReply {path}                         mkdir
  ListDir  {path, recursive, hidden, limit}
                                    -> Listing {path, count, truncated}
                                       + [memfd holding msgpack rows]           list_dir
  Code     {action, name, shared}   -> CodeState {path, sealed}                 code_dir

Bulk data never crosses the channel: the daemon reads the returned fd itself, and pours writes
into a pipe that the init drains from its event loop (so it stays free to reap and spawn, and
the written pages are charged to the room's memory cgroup, not the daemon's); a listing goes
through a memfd (charged to the room likewise). Errors are OSError with the errno the daemon
maps to wire codes.

The room's own invariants, kept even though nothing here can reach the host:

* every lookup uses openat2(RESOLVE_NO_MAGICLINKS): ``/proc/<pid>/fd/N``, ``/proc/<pid>/root``
  and ``/proc/<pid>/cwd`` are not followed, so an fd some process of the room holds (a payload
  briefly holds its run cgroup's directory fds between fork and exec) is never reached by path;
* content and mutations are refused on pseudo filesystems (proc, sysfs, cgroup, devpts, ...):
  ``/proc/1/environ`` is the init's — the daemon's — environment, ``/proc/self/mem`` its memory;
* content operations accept only regular files, checked with fstat on the opened fd (a FIFO is
  opened O_NONBLOCK, so a FIFO planted by the room cannot hang the init, and a device or FIFO
  never reaches the daemon); a pre-open stat spares devices an open() with side effects;
* recursive listings never follow symlinks (RESOLVE_NO_SYMLINKS per directory), so a link swapped
  in during the walk leads nowhere, and they stop at LIST_MAX_DEPTH and at the entry limit.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from typing import Any

import msgspec

from . import _syscalls as sc
from . import messages as m

WORKSPACE = "/workspace"
LIST_MAX_DEPTH = 128
LIST_MAX_ENTRIES = 100_000

# Filesystems whose files are kernel interfaces, not data (read through the daemon, /proc files
# would hand out the init's environment and memory; sysfs/cgroup files are host-wide knobs).
PSEUDO_FS = frozenset({"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "securityfs",
                       "debugfs", "tracefs", "bpf", "configfs", "fusectl", "pstore",
                       "efivarfs", "binfmt_misc", "hugetlbfs", "autofs", "rpc_pipefs",
                       "nsfs", "pipefs", "sockfs", "anon_inodefs"})
PSEUDO_PREFIXES = ("/proc", "/sys")

_NO_MAGIC = sc.RESOLVE_NO_MAGICLINKS
_pseudo_devs: frozenset[int] | None = None
_enc = msgspec.msgpack.Encoder()


# --- paths ---------------------------------------------------------------------------------------


def resolve(path: str) -> str:
    """The absolute, lexically normalised form of a user path (relative to /workspace).

    Lexical normalisation is safe here: whatever ``..`` and symlinks mean, they mean it inside
    the room's root, which is the only tree this process has.
    """
    if not isinstance(path, str) or not path or "\x00" in path:
        raise OSError(errno.EINVAL, "invalid path", str(path))
    full = path if path.startswith("/") else f"{WORKSPACE}/{path}"
    norm = posixpath.normpath(full).lstrip("/")  # normpath keeps a leading "//"
    return "/" + norm if norm != "." else "/"


def split(path: str) -> tuple[str, str]:
    """(parent, name) of a resolved path; name is "" for the root."""
    if path == "/":
        return "/", ""
    parent, name = posixpath.split(path)
    return parent or "/", name


def _pseudo() -> frozenset[int]:
    """Device numbers of every pseudo-filesystem mount of the room (fixed after set-up: the
    seccomp filter denies mount and umount)."""
    global _pseudo_devs
    if _pseudo_devs is None:
        devs: set[int] = set()
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                major, minor = fields[2].split(":")
                fstype, point = fields[sep + 1], fields[4]
                if fstype in PSEUDO_FS or any(point == p or point.startswith(p + "/")
                                              for p in PSEUDO_PREFIXES):
                    devs.add(os.makedev(int(major), int(minor)))
        _pseudo_devs = frozenset(devs)
    return _pseudo_devs


def _check_fs(fd: int, path: str) -> os.stat_result:
    st = os.fstat(fd)
    if st.st_dev in _pseudo():
        raise OSError(errno.EACCES, "the file API does not reach kernel interfaces "
                                    "(/proc, /sys, ...)", path)
    return st


def _named(err: OSError, path: str) -> OSError:
    """The same error, naming the path the caller gave (not the dir-fd-relative name used)."""
    num = err.errno or errno.EIO
    return OSError(num, os.strerror(num), path)


def _open(path: str, flags: int, *, dirfd: int = -100, mode: int = 0, resolve: int = _NO_MAGIC,
          name: str | None = None) -> int:
    """openat2 with the room's resolution rules; errors name the user-visible path."""
    try:
        return sc.openat2(dirfd, name if name is not None else path, flags | os.O_CLOEXEC, mode,
                          resolve)
    except OSError as err:
        raise _named(err, path) from None


def _dir(path: str, create: bool = False) -> int:
    """An O_PATH fd of directory ``path``; with ``create``, make missing components (mkdir -p),
    one openat2 per component so that no step follows a magic link."""
    flags = os.O_PATH | os.O_DIRECTORY
    if not create:
        return _open(path, flags)
    fd = os.open("/", flags | os.O_CLOEXEC)
    done = ""
    try:
        for comp in [c for c in path.split("/") if c]:
            done += "/" + comp
            try:
                nfd = _open(done, flags, dirfd=fd, name=comp)
            except FileNotFoundError:
                _check_fs(fd, done)
                try:
                    os.mkdir(comp, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass  # a concurrent mkdir (a payload's) won the race: fine
                nfd = _open(done, flags, dirfd=fd, name=comp)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _not_regular(st: os.stat_result, path: str) -> OSError:
    if stat.S_ISDIR(st.st_mode):
        return OSError(errno.EISDIR, "is a directory", path)
    return OSError(errno.EPERM, f"not a regular file ({_kind(st.st_mode)})", path)


# --- content -------------------------------------------------------------------------------------


def open_read(msg: m.OpenRead) -> tuple[m.Opened, int]:
    """The reply and an O_RDONLY fd of the regular file ``msg.path`` (the caller closes it)."""
    path = resolve(msg.path)
    try:
        pre = os.stat(path)
    except OSError as err:
        raise _named(err, path) from None
    if not stat.S_ISREG(pre.st_mode):
        raise _not_regular(pre, path)
    # O_NONBLOCK: should a FIFO be swapped in after the stat, open() returns at once.
    fd = _open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = _check_fs(fd, path)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(st, path)
    except BaseException:
        os.close(fd)
        raise
    return m.Opened(path=path, size=st.st_size, mtime=st.st_mtime, mode=st.st_mode), fd


class FileWriter:
    """``Write {path, size, append}`` + [read end of a pipe]: the daemon pours the content
    into the pipe, the init splices it into a temporary file beside the target and renames it
    over the target once exactly ``size`` bytes arrived (issue 23, D4; issue 10, H4).

    Why the init writes: a tmpfs page belongs to the memory cgroup of the process that first
    writes it. The daemon writing through an fd the init opened charged whole files to the
    daemon's cgroup (32 writes of 32 MiB put 1 GiB into a room limited to 64 MiB). Why a
    temporary file and a rename: a client that went away mid-request left the target truncated
    to 0 bytes; now a reader sees the old content or the new, never a torn file, also when the
    room's disk fills mid-write (the temporary file is removed and the target is untouched).
    Appends go in place (chunked uploads stay linear) and are cut back to the old size when
    they do not complete.
    A symlink at the target is followed (inside the room, never through a magic link), as
    open() did: the link stays a link and its target gets the content.
    """

    _seq = 0

    def __init__(self, msg: m.Write, fds: list[int]) -> None:
        # The fds become the job's only once it exists (the init closes them otherwise).
        if len(fds) != 1:
            raise OSError(errno.EINVAL, "Write needs one pipe fd")
        self.fd = fds[0]
        self.out = self.dfd = self.keep = -1
        self.tmp = ""
        try:
            os.set_blocking(self.fd, False)
            self.size = msg.size
            self.written = 0
            self._open_target(resolve(msg.path), msg.append)
        except BaseException:
            self.fd = -1
            self.close()
            raise

    def _open_target(self, path: str, append: bool) -> None:
        for _ in range(40):  # the kernel's own limit on links followed in one lookup
            parent, name = split(path)
            if not name:
                raise OSError(errno.EISDIR, "is a directory", path)
            dfd = _dir(parent, create=True)
            try:
                _check_fs(dfd, parent)
                try:
                    pre: os.stat_result | None = os.stat(name, dir_fd=dfd,
                                                         follow_symlinks=False)
                except FileNotFoundError:
                    pre = None
                if pre is None or not stat.S_ISLNK(pre.st_mode):
                    break
                target = os.readlink(name, dir_fd=dfd)
                here = os.readlink(f"/proc/self/fd/{dfd}")
            except BaseException:
                os.close(dfd)
                raise
            os.close(dfd)
            path = resolve(target if target.startswith("/") else f"{here}/{target}")
        else:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
        self.dfd, self.name, self.path = dfd, name, path
        if pre is not None and not stat.S_ISREG(pre.st_mode):
            raise _not_regular(pre, path)
        self.keep = -1
        if append and pre is not None:
            # In place, so that chunked uploads (cp) stay linear; on failure the file is cut
            # back to its old size: it ends as old or old + new, never a piece of the new.
            # (Not O_APPEND: splice refuses append-mode targets; we seek to the end instead.)
            self.out = _open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY,
                             dirfd=dfd, name=name, resolve=_NO_MAGIC | sc.RESOLVE_NO_SYMLINKS)
            st = _check_fs(self.out, path)
            if not stat.S_ISREG(st.st_mode):
                raise _not_regular(st, path)
            self.keep = os.lseek(self.out, 0, os.SEEK_END)
            return
        FileWriter._seq += 1
        self.tmp = f".{name[:180]}.sbx-write-{FileWriter._seq}"
        self.out = _open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, dirfd=dfd, name=self.tmp,
                         mode=0o600, resolve=_NO_MAGIC | sc.RESOLVE_NO_SYMLINKS)
        if pre is not None:
            # The new content takes the old file's place: its owner and mode too.
            os.fchown(self.out, pre.st_uid, pre.st_gid)
            os.fchmod(self.out, stat.S_IMODE(pre.st_mode))
        else:
            os.fchmod(self.out, 0o644)

    def step(self) -> m.Written | None:
        try:
            while True:
                try:
                    n = os.splice(self.fd, self.out, 1 << 20, flags=os.SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    return None  # the daemon has not poured more yet
                if n == 0:
                    break
                self.written += n
                if self.written > self.size:
                    raise OSError(errno.EINVAL, "more data than announced", self.path)
            if self.written != self.size:
                # The daemon closed early: its request was cancelled (the client went away).
                raise OSError(errno.ECANCELED, "the write was cancelled", self.path)
            if self.tmp:
                os.rename(self.tmp, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
                self.tmp = ""
            self.keep = -1
        except OSError as err:
            raise _named(err, self.path) from None
        return m.Written(path=self.path, bytes_written=self.written)

    def close(self) -> None:
        if self.keep >= 0 and self.out >= 0:
            try:
                os.ftruncate(self.out, self.keep)  # an append that did not finish
            except OSError:
                pass
        if self.tmp and self.dfd >= 0:
            try:
                os.unlink(self.tmp, dir_fd=self.dfd)
            except OSError:
                pass
            self.tmp = ""
        for fd in (self.fd, self.out, self.dfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.out = self.dfd = -1


# --- metadata ------------------------------------------------------------------------------------


def exists(msg: m.Exists) -> m.Existence:
    path = resolve(msg.path)
    try:
        fd = _open(path, os.O_PATH)
    except (FileNotFoundError, NotADirectoryError):
        return m.Existence(path=path, exists=False)
    try:
        return m.Existence(path=path, exists=True, type=_kind(os.fstat(fd).st_mode))
    finally:
        os.close(fd)


def delete(msg: m.Delete) -> m.PathReply:
    path = resolve(msg.path)
    parent, name = split(path)
    if not name:
        raise OSError(errno.EISDIR, "is a directory", path)
    dfd = _dir(parent)
    try:
        _check_fs(dfd, parent)
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, "is a directory", path)
        # unlinkat without AT_REMOVEDIR: a directory swapped in now fails with EISDIR anyway,
        # and a symlink is removed itself, never its target.
        os.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)
    return m.PathReply(path=path)


def rename(msg: m.Rename) -> m.Renamed:
    src = resolve(msg.src)
    dst = resolve(msg.dst)
    sparent, sname = split(src)
    if not sname:
        raise OSError(errno.EBUSY, "cannot move the root directory", src)
    if msg.into:
        try:
            dfd = _open(dst, os.O_PATH | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            pass
        else:
            os.close(dfd)
            dst = posixpath.join(dst, sname)
    dparent, dname = split(dst)
    if not dname:
        raise OSError(errno.EBUSY, "cannot replace the root directory", dst)
    sfd = _dir(sparent)
    try:
        _check_fs(sfd, sparent)
        dfd = _dir(dparent)
        try:
            _check_fs(dfd, dparent)
            try:
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            except OSError as err:
                # Name the side the kernel complained about: a missing source is the usual case.
                side = src if err.errno == errno.ENOENT else dst
                raise _named(err, side) from None
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return m.Renamed(path=src, new_path=dst)


def mkdir(msg: m.Mkdir) -> m.PathReply:
    path = resolve(msg.path)
    if msg.recursive:
        try:
            os.close(_dir(path, create=True))
        except NotADirectoryError:
            # mkdir -p over an existing file: the name is taken.
            try:
                st = os.stat(path)
            except OSError:
                raise OSError(errno.ENOTDIR, "not a directory", path) from None
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EEXIST, "exists and is not a directory", path) from None
            raise
        return m.PathReply(path=path)
    parent, name = split(path)
    if not name:
        raise OSError(errno.EEXIST, "exists", path)
    dfd = _dir(parent)
    try:
        _check_fs(dfd, parent)
        try:
            os.mkdir(name, 0o755, dir_fd=dfd)
        except OSError as err:
            raise _named(err, path) from None
    finally:
        os.close(dfd)
    return m.PathReply(path=path)


def _wire_name(name: str) -> str | bytes:
    """A name as text when it is UTF-8, else its raw bytes: one file name that is not UTF-8 made
    msgpack fail for its whole directory and every recursive listing above it (issue 10, L2)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name)


def list_dir(msg: m.ListDir) -> tuple[m.Listing, int]:
    """Rows ``[name, relativePath, type, size, mtime, mode]`` in a memfd (msgpack array); the
    caller closes the memfd."""
    path = resolve(msg.path)
    recursive, hidden = msg.recursive, msg.hidden
    limit = LIST_MAX_ENTRIES if msg.limit is None else min(msg.limit, LIST_MAX_ENTRIES)
    rows: list[list[Any]] = []
    truncated = False
    top = _open(path, os.O_RDONLY | os.O_DIRECTORY)

    def walk(dfd: int, rel: str, depth: int) -> None:
        nonlocal truncated
        with os.scandir(dfd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if not hidden and entry.name.startswith("."):
                continue
            if len(rows) >= limit:
                truncated = True
                return
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed while we looked
            r = f"{rel}/{entry.name}" if rel else entry.name
            rows.append([_wire_name(entry.name), _wire_name(r), _kind(st.st_mode), st.st_size,
                         st.st_mtime, stat.filemode(st.st_mode)[1:]])
            if recursive and stat.S_ISDIR(st.st_mode):
                if depth >= LIST_MAX_DEPTH:
                    truncated = True
                    continue
                try:
                    # Never through a symlink (one swapped in since the stat is refused).
                    sub = sc.openat2(dfd, entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                     0, sc.RESOLVE_NO_SYMLINKS | _NO_MAGIC)
                except OSError:
                    continue
                try:
                    walk(sub, r, depth + 1)
                finally:
                    os.close(sub)
                if truncated:
                    return

    try:
        walk(top, "", 0)
    finally:
        os.close(top)
    mfd = os.memfd_create("sandboxd-list", os.MFD_CLOEXEC)
    try:
        data = memoryview(_enc.encode(rows))
        while data:
            data = data[os.write(mfd, data):]
        os.lseek(mfd, 0, os.SEEK_SET)
    except BaseException:
        os.close(mfd)
        raise
    return m.Listing(path=path, count=len(rows), truncated=truncated), mfd


# --- the code-run cache (issue 10, M2) -----------------------------------------------------------
# runCode keeps each compiled submission in CODE_BASE/<hash> and reuses it for the same source.
# Room code runs as the room's root (without capabilities), so a cache it could write would run
# the attacker's binary as the next submission's ("cached": true). Hence: CODE_BASE is a mount
# point (it cannot be renamed or removed) owned by SEAL_UID, a mapped id nobody runs as, mode
# 0755, so only the init (with capabilities in the room) makes or removes entries; a workdir is
# the payloads' own while its compile runs and is then *sealed* — every entry chowned to
# SEAL_UID and its write bits cleared — so no payload, root or sandbox, can change it. A cached
# workdir is trusted only when it is sealed. In single-id mode SEAL_UID is not mapped: no seal,
# so the service never reuses a compile there.
CODE_BASE = "/tmp/.sandboxd"
SEAL_UID = 4000


def seal_uid_mapped(proc: str = "/proc/self/uid_map") -> bool:
    try:
        with open(proc) as f:
            rows = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    except OSError:
        return False
    return any(inner <= SEAL_UID < inner + count for inner, _outer, count in rows)


def setup_code_base(root: str) -> None:
    """At room set-up (before pivot_root): the cache base as a self-bind-mount owned by
    SEAL_UID when that id is mapped."""
    base = f"{root}{CODE_BASE}"
    os.makedirs(base, exist_ok=True)
    sc.mount(base, base, None, sc.MS_BIND)
    if seal_uid_mapped():
        os.chown(base, SEAL_UID, SEAL_UID)
    os.chmod(base, 0o755)


def _code_dir(msg: m.Code) -> tuple[str, str]:
    name = msg.name
    if not name or "/" in name or name.startswith("."):
        raise OSError(errno.EINVAL, "invalid code directory name", name)
    return CODE_BASE, name


def _remove_tree(dfd: int, name: str) -> None:
    """rm -rf of ``name`` in ``dfd``, never following a link (the init has the capabilities to
    remove what payloads made read-only)."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dfd)
        return
    sub = sc.openat2(dfd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0,
                     sc.RESOLVE_NO_SYMLINKS | _NO_MAGIC | sc.RESOLVE_NO_XDEV)
    try:
        os.fchmod(sub, 0o700)
        for entry in os.listdir(sub):
            _remove_tree(sub, entry)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=dfd)


def _seal_tree(fd: int) -> None:
    for entry in os.scandir(fd):
        st = entry.stat(follow_symlinks=False)
        os.chown(entry.name, SEAL_UID, SEAL_UID, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            continue
        os.chmod(entry.name, stat.S_IMODE(st.st_mode) & ~0o222 & ~0o7000, dir_fd=fd)
        if stat.S_ISDIR(st.st_mode):
            sub = sc.openat2(fd, entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0,
                             sc.RESOLVE_NO_SYMLINKS | _NO_MAGIC | sc.RESOLVE_NO_XDEV)
            try:
                _seal_tree(sub)
            finally:
                os.close(sub)


def code_dir(msg: m.Code) -> m.CodeState:
    """``Code {action, name}``: ``state`` -> {sealed}; ``prepare`` (a fresh, empty workdir
    for a compile, replacing whatever was there; also a session's state directory);
    ``seal``; ``remove``."""
    base, name = _code_dir(msg)
    action = msg.action
    bfd = sc.openat2(-100, base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0,
                     sc.RESOLVE_NO_SYMLINKS | _NO_MAGIC)
    try:
        path = f"{base}/{name}"
        if action == "state":
            try:
                st = os.stat(name, dir_fd=bfd, follow_symlinks=False)
            except FileNotFoundError:
                return m.CodeState(path=path, sealed=False)
            sealed = (stat.S_ISDIR(st.st_mode) and st.st_uid == SEAL_UID
                      and os.fstat(bfd).st_uid == SEAL_UID and seal_uid_mapped())
            return m.CodeState(path=path, sealed=sealed)
        if action == "prepare":
            _remove_tree(bfd, name)
            os.mkdir(name, 0o755, dir_fd=bfd)
            os.chmod(name, 0o777 if msg.shared else 0o755, dir_fd=bfd)
            return m.CodeState(path=path)
        if action == "remove":
            _remove_tree(bfd, name)
            return m.CodeState(path=path)
        if action == "seal":
            if not seal_uid_mapped():
                raise OSError(errno.EPERM, "no id to seal with (single-id mapping)", path)
            wfd = sc.openat2(bfd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0,
                             sc.RESOLVE_NO_SYMLINKS | _NO_MAGIC | sc.RESOLVE_NO_XDEV)
            try:
                _seal_tree(wfd)
                os.fchown(wfd, SEAL_UID, SEAL_UID)
                os.fchmod(wfd, 0o555)
            finally:
                os.close(wfd)
            return m.CodeState(path=path)
        raise OSError(errno.EINVAL, f"unknown action {action!r}", path)
    except OSError as err:
        raise _named(err, f"{base}/{name}") from None
    finally:
        os.close(bfd)

