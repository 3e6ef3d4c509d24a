"""File watch, the room init's half (issue 15; the daemon's half is ``sandboxd/watches.py``).

Theory of operation. For each watch the daemon asks ``NewInotify`` once: the init makes the
inotify instance, so the kernel counts it and its watches against the room's user namespace —
whose inotify ceilings the init lowered at set-up (jail/user.py ROOM_UCOUNTS) — and not against
the daemon user's pool that every room and the host share. The fd goes to the daemon, which
owns it from then on: it reads the events, and closing it (unwatch, the connection gone, the room
torn down) removes every watch at once. ``AddWatch`` brings the fd back with a directory: the
init opens it with the file API's rules (fileops: no magic links, no pseudo filesystems), walks
below it without following a symlink or leaving the filesystem, and adds each directory by its
``/proc/self/fd/N`` name — the inode it opened, not a path the room could swap in between. The
init keeps nothing; the watch-descriptor table is the daemon's.

    NewInotify {}                                  -> Inotify {} + [inotify fd]    new_inotify
    AddWatch {path, recursive, exclude, limit, report} + [inotify fd]
                                                   -> Watched {path, dirs, found, truncated}
"""

from __future__ import annotations

import errno
import fnmatch
import os

from . import _syscalls as sc
from . import fileops
from . import messages as m

MASK = (sc.IN_CREATE | sc.IN_MODIFY | sc.IN_DELETE | sc.IN_MOVED_FROM | sc.IN_MOVED_TO
        | sc.IN_ATTRIB | sc.IN_DELETE_SELF | sc.IN_MOVE_SELF | sc.IN_ONLYDIR | sc.IN_EXCL_UNLINK)
MAX_DEPTH = 128
MAX_LIMIT = 65_536
#: entries reported as already there (``found``) per AddWatch at most
MAX_FOUND = 10_000
_BELOW = (os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0,
          sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS | sc.RESOLVE_NO_XDEV)


def new_inotify() -> tuple[m.Inotify, int]:
    return m.Inotify(), sc.inotify_init1(sc.IN_NONBLOCK | sc.IN_CLOEXEC)


def excluded(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def add_watch(msg: m.AddWatch, fds: list[int]) -> m.Watched:
    ifd = fds[0]
    path = fileops.resolve(msg.path)
    top = fileops._open(path, os.O_RDONLY | os.O_DIRECTORY)
    limit = max(1, min(msg.limit, MAX_LIMIT))
    dirs: list[tuple[int, str]] = []
    found: list[tuple[str, bool]] = []
    truncated = False

    def walk(dfd: int, here: str, depth: int) -> None:
        nonlocal truncated
        if len(dirs) >= limit:
            truncated = True
            return
        try:
            wd = sc.inotify_add_watch(ifd, f"/proc/self/fd/{dfd}", MASK)
        except OSError as err:
            if err.errno == errno.ENOSPC:  # the room's inotify watch ceiling
                truncated = True
                return
            raise
        dirs.append((wd, here))
        if not msg.recursive or depth >= MAX_DEPTH:
            return
        with os.scandir(dfd) as it:
            entries = list(it)
        for e in entries:
            try:
                e.name.encode()
            except UnicodeEncodeError:
                continue  # not UTF-8: no JSON path could name it
            sub = f"{here.rstrip('/')}/{e.name}"
            is_dir = e.is_dir(follow_symlinks=False)
            if msg.report and len(found) < MAX_FOUND:
                found.append((sub, is_dir))
            if not is_dir or excluded(e.name, msg.exclude):
                continue
            try:
                cfd = sc.openat2(dfd, e.name, *_BELOW)
            except OSError:
                continue  # gone already, a link swapped in, another filesystem
            try:
                walk(cfd, sub, depth + 1)
            finally:
                os.close(cfd)

    try:
        fileops._check_fs(top, path)
        walk(top, path, 0)
    finally:
        os.close(top)
    return m.Watched(path=path, dirs=dirs, found=found, truncated=truncated)
