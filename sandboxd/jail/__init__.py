"""The jail: everything that turns a room spec into live namespaces.

    handles.py    the daemon's side: ``Zygote`` (start, spawn rooms, stop the fork server) and
                  ``RoomHandle`` (spawn payloads, kill, file operations, the init's death
                  through a pidfd), over ``handles.AsyncChannel``
    messages.py   every message of those channels, as tagged structs (docs/architecture.md,
                  "The channel")
    zygote.py, init.py, fileops.py and the kernel modules: the other side, in the fork server
                  and the room inits

The room set-up order itself (one step per line, each constraint commented) lives where it runs:
``zygote._setup_process`` (cgroup, unshare, maps) and ``init.main``/``Init.setup`` (mounts,
network, hostname, serve). ``jail`` knows nothing of JSON-RPC.

This package module stays import-free: the room init (a fork of the zygote) imports the package,
and must not pay for asyncio, subprocess or logging through it.
"""

from __future__ import annotations


class JailError(OSError):
    """The sandbox machinery failed (never the payload)."""


__all__ = ["JailError"]
