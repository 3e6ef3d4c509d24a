"""Pure validation of the request limits (issues 10 H3/H9, 23 D10/D12): schema bounds on every
integer, the admin's ceilings, host-exhaustion errors without host paths, socket directories."""

from __future__ import annotations

import errno
import os
import tempfile

import pytest

from sandboxd import config, errors, protocol
from sandboxd.config import GiB, MiB, RoomLimits, RoomLimitsMax
from sandboxd.rooms import resolve_options
from sandboxd.server import host_exhaustion


@pytest.mark.parametrize("digits", [20, 310, 4300])
def test_huge_integers_are_invalid_params(digits: int) -> None:
    """D10: a 310-4,300 digit timeout passed validation and overflowed later in runs.run."""
    big = 10 ** digits
    for params in ({"timeout": big}, {"limits": {"wallTimeMs": big}},
                   {"limits": {"outputBytes": big}}, {"limits": {"pids": big}}):
        with pytest.raises(errors.InvalidParams):
            protocol.convert_params("exec", {"sandboxId": "a", "command": "x", **params})


def test_room_limits_have_schema_bounds() -> None:
    with pytest.raises(errors.InvalidParams):
        resolve_options({"limits": {"memoryBytes": 10 ** 400}}, RoomLimits())


def test_room_ceilings_name_the_limit_and_the_maximum() -> None:
    top = RoomLimitsMax(memory_bytes=2 * GiB, cpus=2.0, pids=4096, disk_bytes=4 * GiB)
    for name, value in (("memoryBytes", 1 << 40), ("pids", 4194304), ("diskBytes", 1 << 40),
                        ("cpus", 1024)):
        with pytest.raises(errors.ValidationError) as exc:
            resolve_options({"limits": {name: value}}, RoomLimits(), top)
        assert exc.value.context["limit"] == name
        assert exc.value.context["max"] == getattr(top, {"memoryBytes": "memory_bytes",
                                                         "diskBytes": "disk_bytes"}.get(name, name))
    opts, _ = resolve_options({"limits": {"memoryBytes": 2 * GiB}}, RoomLimits(), top)
    assert opts.limits.memory_bytes == 2 * GiB  # at the ceiling is fine


def test_default_ceilings_protect_the_host() -> None:
    cfg = config.load(None, {"socket": "/tmp/x/s.sock", "state_dir": "/tmp/x", "rootfs": "host"})
    top = cfg.room_limits_max
    assert top.memory_bytes is not None and top.memory_bytes <= max(
        config.host_memory_bytes() // 2, 512 * MiB)
    assert top.cpus == max(config.host_cpus(), 1)
    assert top.pids == 4096
    assert cfg.run_limits_max.output_bytes == 64 * MiB


def test_defaults_above_the_ceiling_refuse_the_config(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "c.toml")
    with open(path, "w") as f:
        f.write("[room_defaults]\npids = 5000\n")
    with pytest.raises(errors.ValidationError, match="room_defaults"):
        config.load(path, {"socket": "/tmp/x/s.sock", "state_dir": "/tmp/x", "rootfs": "host"})


def test_host_exhaustion_has_a_stable_code_and_no_path() -> None:
    """D12: ENOSPC and EMFILE reached clients as INTERNAL_ERROR with host paths."""
    for num in (errno.ENOSPC, errno.EMFILE, errno.ENFILE):
        err = OSError(num, os.strerror(num), "/var/lib/sandboxd/state/rooms/r1/mnt")
        got = host_exhaustion(err)
        assert got is not None and got.code == "HOST_RESOURCE_EXHAUSTED"
        assert "/var/lib" not in got.message and "/var/lib" not in str(got.to_wire())
        try:
            try:
                raise err
            except OSError as inner:
                raise errors.InternalError(f"cannot make room: {inner}") from inner
        except errors.InternalError as wrapped:
            again = host_exhaustion(wrapped)
        assert again is not None and again.code == "HOST_RESOURCE_EXHAUSTED"
    assert host_exhaustion(OSError(errno.EACCES, "denied")) is None
    assert host_exhaustion(errors.FileNotFound("x")) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory another uid owns")
def test_untrusted_socket_directories() -> None:
    """H9: another user's directory (or a group/world-writable one) is never trusted."""
    base = tempfile.mkdtemp(dir="/tmp")
    try:
        os.chmod(base, 0o700)
        assert config.untrusted_dir(base) is None
        os.chown(base, 65534, 65534)
        assert "owned by uid 65534" in (config.untrusted_dir(base) or "")
        os.chown(base, 0, 0)
        os.chmod(base, 0o777)
        assert "writable" in (config.untrusted_dir(base) or "")
        os.chmod(base, 0o1777)  # sticky: fine above the socket's dir, not as the dir itself
        assert config.untrusted_dir(base) is not None
        sub = os.path.join(base, "mine")
        os.mkdir(sub, 0o700)
        assert config.untrusted_dir(sub) is None
        os.chown(base, 65534, 65534)
        assert "owned by uid 65534" in (config.untrusted_dir(sub) or "")
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
