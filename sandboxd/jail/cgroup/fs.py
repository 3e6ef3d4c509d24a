"""The filesystem seam: every cgroupfs access of the backends goes through an ``Fs``.

The unit tests subclass it to emulate the kernel on a tmp tree (tests/unit/cgroupfake.py); the
real one translates OSError into InternalError naming the path and the errno, at this edge.
Also the small parsers of cgroupfs files every backend reads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable

from ...errors import InternalError

__all__ = ["Fs", "ints", "join", "keyed"]


class Fs:
    """Every cgroupfs access. Tests subclass it to emulate the kernel on a tmp tree."""

    def read(self, path: str) -> str:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                return f.read()
        except OSError as err:
            raise InternalError(f"cannot read {path}: {err.strerror}", path=path,
                                errno=err.errno) from err

    def read_opt(self, path: str) -> str | None:
        """Read a file the kernel may not provide (memory.peak, pids.peak...), or of a cgroup
        that is going away: a walk over a room's subtree meets the cgroups of finished runs
        being removed beside it, whose files answer ENODEV between the listing and the read
        (the run's kernfs node is deactivated; a room-wide figure then simply lacks it)."""
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno == errno.ENODEV:
                return None
            raise InternalError(f"cannot read {path}: {err.strerror}", path=path,
                                errno=err.errno) from err

    def write(self, path: str, value: str) -> None:
        # O_TRUNC: a no-op on cgroupfs, needed on the fake tree. No O_CREAT: a missing
        # interface file is an error, never a new regular file.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as err:
            raise InternalError(f"cannot write {value!r} to {path}: {err.strerror}", path=path,
                                errno=err.errno) from err

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def access(self, path: str, mode: int) -> bool:
        return os.access(path, mode)

    def listdirs(self, path: str) -> list[str]:
        try:
            with os.scandir(path) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        except OSError as err:
            raise InternalError(f"cannot list {path}: {err.strerror}", path=path) from err

    def mkdir(self, path: str, mode: int = 0o755) -> bool:
        """Create a cgroup; False if it already existed."""
        try:
            os.mkdir(path, mode)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            raise InternalError(f"mkdir {path}: {err.strerror}", path=path,
                                errno=err.errno) from err

    def rmdir(self, path: str) -> None:
        os.rmdir(path)  # callers translate: EBUSY means "still populated"

    def chmod(self, path: str, mode: int) -> None:
        try:
            os.chmod(path, mode)
        except OSError as err:
            raise InternalError(f"chmod {mode:o} {path}: {err.strerror}", path=path) from err

    def chown(self, path: str, uid: int, gid: int) -> None:
        try:
            os.chown(path, uid, gid)
        except OSError as err:
            raise InternalError(f"chown {uid}:{gid} {path}: {err.strerror}", path=path) from err

    def open_dir(self, path: str) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise InternalError(f"open {path}: {err.strerror}", path=path) from err

    def open_procs(self, path: str) -> int:
        try:
            return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as err:
            raise InternalError(f"open {path}: {err.strerror}", path=path) from err

    def kill(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def signal_members(self, members: Callable[[], set[int]], sig: int) -> int:
        """``sig``, then SIGCONT, to each pid of ``members()`` that is still a member once a
        pidfd holds it (see ``Ops.signal``); how many were signalled."""
        held: dict[int, int] = {}
        sent = 0
        try:
            for pid in members():
                with contextlib.suppress(OSError):
                    held[pid] = os.pidfd_open(pid)
            still = members()
            for pid, fd in held.items():
                if pid not in still:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, sig)
                    sent += 1
                    if sig not in (signal.SIGKILL, signal.SIGCONT):
                        signal.pidfd_send_signal(fd, signal.SIGCONT)
        finally:
            for fd in held.values():
                os.close(fd)
        return sent

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def ints(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def keyed(text: str | None, key: str) -> int | None:
    """A value from a flat keyed file (cpu.stat, memory.events, memory.oom_control)."""
    if text is None:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return ints(parts[1])
    return None


def join(root: str, rel: str) -> str:
    rel = rel.strip("/")
    return os.path.join(root, rel) if rel else root
