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
