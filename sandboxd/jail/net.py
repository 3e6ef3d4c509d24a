"""The room's network namespace: loopback only (egress is a later, opt-in feature).

All pyroute2 use lives here. Runs in the room init after unshare(CLONE_NEWNET), while it still
holds CAP_NET_ADMIN in the room's user namespace. IPRoute is closed before returning: the init
forks payloads and must stay single-threaded with no stray sockets.
"""

from __future__ import annotations

from pyroute2 import IPRoute


def setup_loopback() -> None:
    with IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=idx, state="up")
