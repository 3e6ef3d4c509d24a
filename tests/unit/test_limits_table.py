"""The one limits table (sandboxd.limits) covers every limit the wire accepts, and everything that
answers "what can this host enforce" reads it."""

from __future__ import annotations

import msgspec
import pytest

from sandboxd import limits
from sandboxd.config import RoomLimits
from sandboxd.errors import LimitUnavailable
from sandboxd.jail.cgroup.disabled import DisabledBackend
from sandboxd.limits import Enforcement, Scope
from sandboxd.protocol import RunLimits


def _wire_names(struct: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(struct)}


def test_every_wire_limit_has_one_row_with_its_scope() -> None:
    assert len(limits.BY_WIRE) == len(limits.LIMITS)
    rooms = {lim.wire for lim in limits.LIMITS if lim.scope & Scope.ROOM}
    runs = {lim.wire for lim in limits.LIMITS if lim.scope & Scope.RUN}
    assert rooms == _wire_names(RoomLimits)
    assert runs == _wire_names(RunLimits)


def test_controller_rows_name_a_controller_and_a_backend_name() -> None:
    for lim in limits.LIMITS:
        controlled = lim.enforcement is Enforcement.CONTROLLER
        assert (lim.controller is not None) == controlled, lim
        assert (lim.cgroup_name is not None) == controlled, lim
        assert bool(lim.cost) == controlled, lim
    assert {lim.cgroup_name for lim in limits.CGROUP_LIMITS} == {"memory", "cpus", "pids"}


@pytest.mark.parametrize(("controllers", "accounting", "want"), [
    ((), False, {"wallTimeMs", "outputBytes", "fileSizeBytes", "diskBytes"}),
    ((), True, {"wallTimeMs", "outputBytes", "fileSizeBytes", "diskBytes", "cpuTimeMs"}),
    (("memory", "pids", "cpu"), True, set(limits.BY_WIRE)),
    (("memory", "cpuacct", "freezer"), True,
     {"wallTimeMs", "outputBytes", "fileSizeBytes", "diskBytes", "cpuTimeMs", "memoryBytes"}),
])
def test_enforceable(controllers: tuple[str, ...], accounting: bool, want: set[str]) -> None:
    assert limits.enforceable(controllers, accounting) == want


def test_cgroup_enforceable_uses_backend_names() -> None:
    assert limits.cgroup_enforceable({"cpu", "pids", "freezer"}) == {"cpus", "pids"}


def test_first_unenforceable_by_scope_and_name() -> None:
    can = limits.enforceable((), accounting=False)
    room = Scope.ROOM
    assert limits.first_unenforceable(["pids", "memoryBytes"], can, room) is limits.BY_WIRE[
        "memoryBytes"]
    # cpuTimeMs is a run limit: a room never fails on it; a run does without accounting.
    assert limits.first_unenforceable(["cpuTimeMs", "diskBytes", "bogus"], can, room) is None
    assert limits.first_unenforceable(["cpuTimeMs"], can, Scope.RUN) is limits.BY_WIRE[
        "cpuTimeMs"]


def test_disabled_backend_reads_the_table() -> None:
    b = DisabledBackend("test")
    assert b.enforceable_wire() == limits.enforceable((), accounting=False)
    with pytest.raises(LimitUnavailable):
        b.check_limits(RoomLimits(), {"pids"})
