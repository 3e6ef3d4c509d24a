"""``python -m sandboxd.jail.netns_exec USERFD NETFD CMD...``: run the host's CMD as root of a
room's user namespace, inside the room's network namespace only.

How the daemon configures a room's netfilter and routes (``sandboxd/egress.py``) without any
privilege on the host: the daemon's uid owns the room's user namespace, so a process of that uid
may join it (setns grants every capability there) and then the room's network namespace, whose
CAP_NET_ADMIN that gives. The daemon cannot do it itself (setns to a user namespace needs a
single-threaded process), hence this exec'd helper. Its mount namespace stays the host's, so CMD
is the host's ``nft``/``ip``, never a binary of the room; the namespace fds are opened by the
daemon from the live init and passed in, so no pid can be recycled in between. setgroups is
denied in a rootless user namespace: the supplementary groups stay (unmapped) as they were.
"""

from __future__ import annotations

import os
import sys

from . import _syscalls as sc


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print("usage: netns_exec USERFD NETFD CMD...", file=sys.stderr)
        return 2
    userfd, netfd = int(argv[1]), int(argv[2])
    sc.setns(userfd, sc.CLONE_NEWUSER)
    sc.setns(netfd, sc.CLONE_NEWNET)
    os.close(userfd)
    os.close(netfd)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)  # the room's root: its capabilities survive the exec
    os.execvp(argv[3], argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
