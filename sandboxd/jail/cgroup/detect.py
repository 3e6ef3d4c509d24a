"""Which backend this host gets: ``detect()``, called once at daemon start-up."""

from __future__ import annotations

from ...errors import LimitUnavailable, ValidationError
from . import v1, v2
from .disabled import DisabledBackend
from .fs import Fs
from .interface import CgroupBackend
from .v1 import V1Backend
from .v2 import V2Backend

__all__ = ["detect"]


def detect(config_backend: str = "auto", parent: str | None = None,
           v1_root: str = "/sys/fs/cgroup", v2_root: str | None = None,
           proc_root: str = "/proc", *, user: str | None = None,
           fs: Fs | None = None, instance: str | None = None) -> CgroupBackend:
    """Pick the backend. Explicit v1/v2 that cannot work raise LimitUnavailable (fail loudly).

    ``instance`` (v1 only; v2 rooms already live under the daemon's own cgroup) names a
    per-daemon subdirectory of the delegated parent, see V1Backend.use_instance.

    auto: complete v2 (memory+pids+cpu) > complete v1 (memory+pids+cpu+cpuacct+freezer) >
    partial v2 (kill and CPU figures, some limits) > partial v1 (freezer needed) > disabled.
    ``parent`` is a path relative to the hierarchy root(s): for v2 the delegated subtree that
    holds the rooms, for v1 the delegated directory (default ``sandboxd/<user>``).
    """
    fs = fs or Fs()
    if config_backend == "disabled":
        return DisabledBackend("disabled by configuration")
    if config_backend not in ("auto", "v1", "v2"):
        raise ValidationError(f"unknown cgroup backend {config_backend!r}",
                              backend=config_backend)
    b2: V2Backend | str = "not tried"
    b1: V1Backend | str = "not tried"
    if config_backend in ("auto", "v2"):
        b2 = v2.probe(v1_root, v2_root, parent, proc_root, fs)
        if config_backend == "v2":
            if isinstance(b2, str):
                raise LimitUnavailable(f"cgroup backend v2 unusable: {b2}", limit="cgroup",
                                       backend="v2")
            return b2
    if config_backend in ("auto", "v1"):
        b1 = v1.probe(v1_root, parent, user, fs)
        if instance and isinstance(b1, V1Backend):
            b1.use_instance(instance)
        if config_backend == "v1":
            if isinstance(b1, str):
                raise LimitUnavailable(f"cgroup backend v1 unusable: {b1}", limit="cgroup",
                                       backend="v1")
            return b1
    if isinstance(b2, V2Backend) and not b2.missing:
        return b2
    if isinstance(b1, V1Backend) and not b1.missing:
        return b1
    if isinstance(b2, V2Backend):
        return b2
    if isinstance(b1, V1Backend):
        return b1
    return DisabledBackend("no usable cgroup hierarchy", tried={"v2": b2, "v1": b1})
