"""User namespace identities: who the room's root is on the host.

Parent side (the zygote, in the host user namespace) writes the maps of a child that has just
unshared CLONE_NEWUSER; the child waits for them before doing anything else.

- single mapping: room uid/gid 0 -> the daemon's own uid/gid, one id. Needs no privilege, but
  setgroups must be denied first (CVE-2014-8989: otherwise an unprivileged mapper could drop
  supplementary groups that deny it access).
- subordinate ranges (``sandboxctl setup`` gave the daemon's user a range in /etc/subuid): room
  ids 0..N-1 -> a slice of that range via the setuid helpers newuidmap/newgidmap, so the room's
  root is never the daemon's host uid.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class IdMap:
    """What to map: ``count`` ids starting at host ``uid_base``/``gid_base`` (single when 1)."""

    uid_base: int
    gid_base: int
    count: int = 1

    @property
    def single(self) -> bool:
        return self.count == 1


def single(uid: int | None = None, gid: int | None = None) -> IdMap:
    return IdMap(os.getuid() if uid is None else uid, os.getgid() if gid is None else gid, 1)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def write_maps(pid: int, ids: IdMap) -> None:
    """Parent side: give ``pid`` (just unshared) its uid and gid maps."""
    if ids.single:
        _write(f"/proc/{pid}/setgroups", "deny")
        _write(f"/proc/{pid}/uid_map", f"0 {ids.uid_base} 1\n")
        _write(f"/proc/{pid}/gid_map", f"0 {ids.gid_base} 1\n")
        return
    for tool, base in (("newuidmap", ids.uid_base), ("newgidmap", ids.gid_base)):
        res = subprocess.run([tool, str(pid), "0", str(base), str(ids.count)],
                             capture_output=True, text=True, timeout=10, check=False)
        if res.returncode != 0:
            raise OSError(f"{tool} {pid} 0 {base} {ids.count} failed: {res.stderr.strip()}")


def subordinate_range(user: str, path: str = "/etc/subuid") -> tuple[int, int] | None:
    """The first subordinate range of ``user`` (name or uid) in ``path``, as (start, count)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] == user and parts[1].isdigit() and parts[2].isdigit():
            return int(parts[1]), int(parts[2])
    return None
