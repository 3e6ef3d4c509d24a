"""Process hardening through prctl: names, no_new_privs, capabilities, death signals, rlimits.

Everything here acts on the calling process. The payload child calls :func:`drop_privileges`
last before seccomp and exec: with an empty bounding set, even the room's uid 0 gains no
capability across execve (the kernel computes P'(permitted) from the bounding set for root).
"""

from __future__ import annotations

import resource
import signal

import prctl


def set_name(name: str) -> None:
    """Name the process for ps (``sandboxd: room abc init``) — argv[0] and comm."""
    try:
        prctl.set_proctitle(name)
    except Exception:  # noqa: BLE001 - proctitle needs argv space; the comm name is enough
        pass
    prctl.set_name(name[:15])


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    prctl.set_pdeathsig(sig)


def non_dumpable() -> None:
    # Same-uid processes cannot ptrace us or read /proc/<pid>/mem (bubblewrap PR #114).
    prctl.set_dumpable(False)


def set_dumpable(on: bool) -> None:
    prctl.set_dumpable(on)


def no_new_privs() -> None:
    prctl.set_no_new_privs(True)


def empty_bounding_set() -> None:
    """Empty the bounding and inheritable sets: nothing exec'd from here on gains a capability,
    while this process keeps its own permitted and effective sets."""
    for cap in prctl.ALL_CAPS:
        try:
            prctl.capbset_drop(cap)
        except (OSError, ValueError):
            pass  # a capability the running kernel does not know
    prctl.cap_inheritable.limit()


def drop_privileges() -> None:
    """Empty bounding, ambient, inheritable, permitted and effective capability sets."""
    # The ambient set needs no separate clearing: the kernel empties it as soon as the
    # inheritable set loses the capabilities (ambient must stay a subset of permitted∩inheritable).
    empty_bounding_set()
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()
    no_new_privs()


def set_rlimits(limits: dict[int, int]) -> None:
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))


# --- per-user kernel counters ------------------------------------------------------------------
# The kernel counts pending signals, POSIX message-queue bytes, processes and locked memory per
# user (ucounts), hierarchically: a room's charges are counted once per (room namespace, uid in
# the room) and again for the namespace's owner — the daemon's uid — in the parent namespace.
# Without ceilings of its own, one room holding ~96k queued signals or six message queues made
# the same call fail in every other room and in the daemon user's host processes (issue 10, H7).
#
# At each level the count is checked against the rlimit of the task (room level) and then
# against the namespace's own maximum, which the kernel copies from the creator's rlimit at
# unshare(CLONE_NEWUSER). So: before unshare, raise the soft limits to the hard ones (the room
# namespace's maximum is the daemon user's whole pool, not less); after it, set soft and hard
# to one room's share (a room's root cannot raise a hard limit: that takes CAP_SYS_RESOURCE in
# the initial namespace). What stays shared: the sum over rooms may still reach the daemon
# user's pool when more than 1/share rooms all fill theirs (docs/security.md).
ROOM_RLIMIT_SHARE = {resource.RLIMIT_SIGPENDING: 16, resource.RLIMIT_MSGQUEUE: 8,
                     resource.RLIMIT_NPROC: 16, resource.RLIMIT_MEMLOCK: 8}


def _hard(which: int) -> int:
    hard = resource.getrlimit(which)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 62


def raise_user_rlimits() -> None:
    """Before unshare(CLONE_NEWUSER): soft = hard for the per-user counters (see above)."""
    for which in ROOM_RLIMIT_SHARE:
        resource.setrlimit(which, (resource.getrlimit(which)[1],) * 2)


def room_user_rlimits() -> dict[int, int]:
    """One room's share of each per-user counter: the hard limit divided by its share."""
    return {which: max(1, _hard(which) // share) for which, share in ROOM_RLIMIT_SHARE.items()}
