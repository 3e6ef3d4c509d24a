"""sandboxd as a system service, under a real systemd booted with systemd-nspawn.

One container per module (boot ~0.5 s, install ~10 s with a warm pip cache): the checkout is
bind-mounted read-only at /src/sandboxd and installed with the documented command,
``scripts/install.sh``, which builds the venv from the container's own /usr/bin/python3. Then the
tests walk the life of the service in order: socket, start, exec from a member of the sandboxd
group, delegated cgroup, refusal of an outsider, watchdog, stop, crash (SIGKILL) + reconcile.

The container's cgroup2 has no controllers on hybrid hosts (the host binds them all to v1), so the
daemon runs its v2 backend without controllers there: kill via cgroup.kill, limits from rlimits and
wall-clock deadlines; `test_report_backend` prints which backend was used.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nspawn
from conftest import skip_unless_ci

pytestmark = pytest.mark.systemd

SOCK = "/run/sandboxd/sandboxd.sock"
UNIT_CG = "/sys/fs/cgroup/system.slice/sandboxd.service"
STATE = "/var/lib/sandboxd/state"
MEMBER, OUTSIDER = "alice", "mallory"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
TIMINGS: dict[str, float] = {}


IN_VM_GUEST = os.environ.get("SANDBOXD_VM_GUEST") == "1"


@pytest.fixture(scope="module")
def c() -> Iterator[nspawn.Container]:
    if IN_VM_GUEST:
        yield from _in_the_guest()
        return
    if (why := nspawn.missing_requirements()) is not None:
        skip_unless_ci(why)
    start = time.monotonic()
    tree = nspawn.build_tree()
    TIMINGS["tree build/lookup s"] = time.monotonic() - start
    nspawn.PIP_CACHE.mkdir(parents=True, exist_ok=True)
    binds_ro = [(str(nspawn.CHECKOUT), "/src/sandboxd")]
    env = {"PIP_CACHE_DIR": "/var/cache/sandboxd-pip"}
    if os.path.exists(HOST_CA):
        # pip in the container trusts what the host trusts (e.g. a TLS-inspecting proxy's CA).
        binds_ro.append((HOST_CA, "/etc/ssl/host-ca.crt"))
        env["PIP_CERT"] = "/etc/ssl/host-ca.crt"
    with nspawn.Container(tree, binds_ro=binds_ro,
                          binds=[(str(nspawn.PIP_CACHE), "/var/cache/sandboxd-pip")]) as box:
        TIMINGS["boot s"] = box.boot_seconds
        start = time.monotonic()
        res = box.run(["/src/sandboxd/scripts/install.sh"], env=env, timeout=1200, check=False)
        TIMINGS["install s"] = time.monotonic() - start
        assert res.returncode == 0, res.stdout + res.stderr
        box.install_env = env  # type: ignore[attr-defined]
        box.sh(f"useradd --create-home --groups sandboxd {MEMBER}; "
               f"useradd --create-home {OUTSIDER}")
        box.baseline_mounts = mount_table(box)  # type: ignore[attr-defined]
        try:
            yield box
        finally:
            if box.proc is not None and box.proc.poll() is None:
                print("\n--- journal of sandboxd ---\n" + box.run(
                    ["journalctl", "-u", "sandboxd.service", "--no-pager", "-o", "short-monotonic"],
                    check=False).stdout[-6000:])
            box.poweroff()
            TIMINGS["poweroff s"] = box.poweroff_seconds
            print("\nsystemd service test timings: " +
                  ", ".join(f"{k} {v:.2f}" for k, v in TIMINGS.items()))


def _in_the_guest() -> Iterator[nspawn.Container]:
    """The VM tier's guest (tests/vm): sandboxd is already installed in its image, its systemd
    is PID 1 and its cgroup2 has every controller. The guest has no network: a re-install takes
    what the venv already holds."""
    box = nspawn.Local()
    box.install_env = {"PIP_NO_INDEX": "1",  # type: ignore[attr-defined]
                       "PIP_NO_BUILD_ISOLATION": "0"}
    box.sh(f"id {MEMBER} >/dev/null 2>&1 || useradd --create-home --groups sandboxd {MEMBER}; "
           f"id {OUTSIDER} >/dev/null 2>&1 || useradd --create-home {OUTSIDER}")
    box.baseline_mounts = mount_table(box)  # type: ignore[attr-defined]
    try:
        yield box
    finally:
        print("\n--- journal of sandboxd ---\n" + box.run(
            ["journalctl", "-u", "sandboxd.service", "--no-pager", "-o", "short-monotonic"],
            check=False).stdout[-6000:])


def ctl(box: nspawn.Container, *args: str, user: str = MEMBER,
        check: bool = True) -> tuple[int, str, str]:
    res = box.run(["sandboxctl", "--socket", SOCK, *args], user=user, check=False, timeout=120)
    if check:
        assert res.returncode == 0, f"sandboxctl {' '.join(args)}: {res.stdout}{res.stderr}"
    return res.returncode, res.stdout, res.stderr


def show(box: nspawn.Container, prop: str, unit: str = "sandboxd.service") -> str:
    return box.run(["systemctl", "show", "-p", prop, "--value", unit]).stdout.strip()


def wait_active(box: nspawn.Container, timeout: float = 30, **want: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = {k: show(box, k) for k in ("ActiveState", "SubState", *want)}
        if state["ActiveState"] == "active" and all(state[k] == v for k, v in want.items()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"sandboxd.service not active: {state}")
        time.sleep(0.1)


def leftovers(box: nspawn.Container) -> dict[str, list[str]]:
    """What a stopped sandboxd must not leave: processes of its user or of the subordinate ids,
    cgroups, mounts, per-room state."""
    subids = box.read("/etc/subuid")
    m = re.search(r"^sandboxd:(\d+):(\d+)$", subids, re.M)
    assert m, subids
    lo, hi = int(m.group(1)), int(m.group(1)) + int(m.group(2))
    uid = int(box.run(["id", "-u", "sandboxd"]).stdout)
    procs = [ln for ln in box.run(["ps", "-eo", "uid=,pid=,args="]).stdout.splitlines()
             if int(ln.split()[0]) == uid or lo <= int(ln.split()[0]) < hi]
    # systemd's own ".control" leaf (where it runs ExecStartPre= of a delegated unit) is not ours.
    cgroups = box.sh(f"[ -d {UNIT_CG} ] && find {UNIT_CG} -mindepth 1 -type d "
                     "-not -name .control || true").stdout
    mounts = sorted(set(mount_table(box)) - set(box.baseline_mounts))  # type: ignore[attr-defined]
    # The daemon's own lock and the empty rooms/ directory may stay; nothing of any room may.
    state = box.sh(f"find {STATE} -mindepth 1 2>/dev/null || true").stdout.split()
    return {"processes": procs, "cgroups": cgroups.split(), "mounts": mounts,
            "state": [s for s in state if s not in (f"{STATE}/rooms", f"{STATE}/sandboxd.lock")]}


def hold(box: nspawn.Container, room: str) -> str:
    """A payload left *running* in ``room`` (its run never ends on its own: a client in the
    background waits on it), returned once it shows among the leftovers, with the room's cgroup
    there too. What a stop or crash tears down must have had something alive in it."""
    secs = f"{100000 + len(room)}{sum(map(ord, room))}"
    box.sh(f"setsid sandboxctl --socket {SOCK} exec {room} -- sleep {secs} "
           ">/dev/null 2>&1 </dev/null &", user=MEMBER)
    deadline = time.monotonic() + 30
    while True:
        now = leftovers(box)
        procs = [p for p in now["processes"] if f"sleep {secs}" in p]
        if procs:
            assert any(room in cg for cg in now["cgroups"]), now
            return procs[0]
        assert time.monotonic() < deadline, f"the held payload in {room} never showed: {now}"
        time.sleep(0.1)


def mount_table(box: nspawn.Container) -> list[str]:
    return box.run(["findmnt", "-rn", "-o", "TARGET,SOURCE,FSTYPE"]).stdout.splitlines()


NOTHING: dict[str, list[str]] = {"processes": [], "cgroups": [], "mounts": [], "state": []}


# --- the flow ------------------------------------------------------------------------------------

def test_install_is_idempotent(c: nspawn.Container) -> None:
    start = time.monotonic()
    res = c.run(["/src/sandboxd/scripts/install.sh"], env=c.install_env,  # type: ignore[attr-defined]
                timeout=600, check=False)
    TIMINGS["re-install s"] = time.monotonic() - start
    assert res.returncode == 0, res.stdout + res.stderr
    assert "already has" in res.stdout
    for f in ("/etc/subuid", "/etc/subgid"):
        assert len(re.findall(r"^sandboxd:", c.read(f), re.M)) == 1, c.read(f)
    assert c.run(["getent", "group", "sandboxd"]).stdout.strip().endswith(MEMBER)


def test_units_verify_clean_in_the_container(c: nspawn.Container) -> None:
    res = c.run(["systemd-analyze", "verify", "/usr/local/lib/systemd/system/sandboxd.socket",
                 "/usr/local/lib/systemd/system/sandboxd.service"], check=False)
    assert (res.returncode, res.stderr) == (0, ""), res.stderr


def test_socket_then_service_start(c: nspawn.Container) -> None:
    c.run(["systemctl", "start", "sandboxd.socket"])
    owner = c.run(["stat", "-c", "%U:%G %a", SOCK]).stdout.split()
    assert owner == ["sandboxd:sandboxd", "660"]
    start = time.monotonic()
    c.run(["systemctl", "start", "sandboxd.service"])  # Type=notify: returns after READY=1
    TIMINGS["service start (to READY=1) s"] = time.monotonic() - start
    assert show(c, "ActiveState") == "active"
    assert show(c, "StatusText") != ""


def test_exec_as_group_member(c: nspawn.Container) -> None:
    start = time.monotonic()
    _, out, _ = ctl(c, "exec", "r1", "--", "sh", "-c", "echo hello from $(hostname); id -u")
    TIMINGS["first exec (room create) s"] = time.monotonic() - start
    lines = out.splitlines()
    assert lines[0].startswith("hello from ") and lines[1] == "0", out  # root of its own userns
    _, out, _ = ctl(c, "rooms")
    assert "r1" in out


def test_socket_survives_a_service_restart(c: nspawn.Container) -> None:
    inode = c.run(["stat", "-c", "%i", SOCK]).stdout.strip()
    c.run(["systemctl", "restart", "sandboxd.service"])
    after = c.run(["stat", "-c", "%i", SOCK], check=False)
    # Python >= 3.13 asyncio unlinks a Unix server's path on close, even for a socket passed in
    # (start_unix_server(sock=..., cleanup_socket=True) is the default): the daemon must pass
    # cleanup_socket=False for systemd's socket, or every restart cuts clients off until the
    # socket unit is restarted.
    assert after.returncode == 0, "the daemon removed systemd's socket when it stopped"
    assert after.stdout.strip() == inode
    ctl(c, "ping")


def test_report_backend(c: nspawn.Container) -> None:
    _, out, _ = ctl(c, "ping", "--json")
    cg = json.loads(out)["capabilities"]["cgroup"]
    print(f"\ncgroup backend in the container: {json.dumps(cg)[:400]}")
    # The unit's delegated cgroup2 subtree (see the module doc): v2, rooms under the unit's
    # cgroup, killed through cgroup.kill (the container's kernel has it).
    assert cg["backend"] == "v2", cg
    assert cg["parent"].startswith(UNIT_CG + "/") or cg["parent"] == UNIT_CG, cg
    assert cg["kill"] == "cgroup.kill", cg


def test_run_limits_in_the_unit_subtree(c: nspawn.Container) -> None:
    """A run's memory and pids limits under the service: enforced by the v2 controllers where the
    unit's subtree has them (the VM tier's guest), refused by name where it has none (nspawn on a
    hybrid host) — never accepted and then ignored."""
    _, out, _ = ctl(c, "ping", "--json")
    controllers = set(json.loads(out)["capabilities"]["cgroup"].get("controllers") or [])
    hog = ["python3", "-c", "b = bytearray(256 << 20); print(len(b))"]
    code, out, err = ctl(c, "exec", "lim", "--json", "--memory", "64M", "--", *hog, check=False)
    if "memory" in controllers:
        res = json.loads(out)
        assert res["status"] == "ML", res
        assert res["memoryPeakBytes"] <= 64 << 20, res
        # The room's cgroup and the run's child lived inside the unit's delegated subtree.
        assert c.sh(f"ls -d {UNIT_CG}/room-*lim").returncode == 0
    else:
        assert code != 0 and "memory" in out + err, (code, out, err)
    if "pids" in controllers:
        code, out, err = ctl(c, "exec", "lim", "--json", "--pids", "8", "--", "sh", "-c",
                             "for i in $(seq 40); do sleep 5 & done; wait", check=False)
        res = json.loads(out)
        assert res["limitExceeded"] == "pids" and res["pidsPeak"] <= 8, (code, res, err)
    print(f"\nrun limits in the unit's subtree: controllers {sorted(controllers)}")
    assert not IN_VM_GUEST or {"memory", "pids", "cpu"} <= controllers, controllers


def test_daemon_sits_in_its_delegated_subtree(c: nspawn.Container) -> None:
    pid = show(c, "MainPID")
    # The v1 lines of a hybrid host show through; the cgroup2 line is systemd's.
    v2 = [ln for ln in c.read(f"/proc/{pid}/cgroup").splitlines() if ln.startswith("0::")]
    assert v2 == ["0::/system.slice/sandboxd.service/supervisor"]
    assert show(c, "Delegate") == "yes"
    # Delegation hands the subtree to User=: the daemon can create the rooms' cgroups there.
    assert c.run(["stat", "-c", "%U", UNIT_CG]).stdout.strip() == "sandboxd"
    assert c.run(["stat", "-c", "%U", f"{UNIT_CG}/cgroup.subtree_control"]).stdout.strip() \
        == "sandboxd"
    # Everything of the daemon's (zygote, rooms) stays inside the unit's subtree.
    pids = c.sh(f"find {UNIT_CG} -name cgroup.procs -exec cat {{}} +").stdout.split()
    uid = c.run(["id", "-u", "sandboxd"]).stdout.strip()
    theirs = c.run(["ps", "-u", uid, "-o", "pid="]).stdout.split()
    assert set(theirs) <= set(pids)


def test_without_delegate_subgroup_the_daemon_moves_itself(c: nspawn.Container) -> None:
    """systemd < 254 ignores DelegateSubgroup=: the daemon must move into the leaf itself."""
    dropin = "/run/systemd/system/sandboxd.service.d"
    c.sh(f"mkdir -p {dropin} && printf '[Service]\\nDelegateSubgroup=\\n' > {dropin}/old.conf"
         " && systemctl daemon-reload && systemctl restart sandboxd.service")
    try:
        assert show(c, "DelegateSubgroup") == ""
        pid = show(c, "MainPID")
        v2 = [ln for ln in c.read(f"/proc/{pid}/cgroup").splitlines() if ln.startswith("0::")]
        assert v2 == ["0::/system.slice/sandboxd.service/supervisor"]
        _, out, _ = ctl(c, "exec", "r1", "--", "echo", "fallback")
        assert out.strip() == "fallback"
    finally:
        c.sh(f"rm -rf {dropin} && systemctl daemon-reload && systemctl restart sandboxd.service")


def test_room_root_is_a_subordinate_id(c: nspawn.Container) -> None:
    _, out, _ = ctl(c, "ping", "--json")
    mapping = json.loads(out).get("capabilities", {}).get("idMapping")
    _, out, _ = ctl(c, "exec", "r1", "--", "cat", "/proc/self/uid_map")
    inside, outside, count = out.split()[:3]
    assert mapping == "subordinate", f"room root maps to the daemon's own uid ({outside})"
    sub = re.search(r"^sandboxd:(\d+):(\d+)$", c.read("/etc/subuid"), re.M)
    assert sub, c.read("/etc/subuid")
    lo, hi = int(sub.group(1)), int(sub.group(1)) + int(sub.group(2))
    assert inside == "0" and lo <= int(outside) and int(outside) + int(count) <= hi, out


PROBE = r"""
cg=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)
mkdir "$cg/../probe-room" && rmdir "$cg/../probe-room" && echo cgroup-ok
exec unshare --user --map-users=auto --map-groups=auto --mount --pid --net --ipc --uts \
    --cgroup --fork --mount-proc --setuid=0 --setgid=0 sh -ec '
    sed -n 1p /proc/self/uid_map
    mount -t tmpfs tmp /mnt && mkdir /mnt/u /mnt/w /mnt/m
    mount -t overlay overlay -o lowerdir=/usr,upperdir=/mnt/u,workdir=/mnt/w /mnt/m
    echo overlay-ok
    mkdir /mnt/p && mount -t proc proc /mnt/p && echo proc-ok
    mkdir /mnt/d && mount -t devpts -o newinstance,ptmxmode=0666 devpts /mnt/d && echo devpts-ok
    hostname room && echo hostname-ok'
"""


def test_hardening_lets_rooms_be_built(c: nspawn.Container) -> None:
    """The unit's exact sandbox, with ExecStart= replaced by what a room needs: newuidmap with
    subordinate ids, overlayfs, a fresh procfs, devpts, sethostname, cgroups in the subtree."""
    c.run(["sh", "-c", "cat > /usr/local/lib/sandboxd-probe.sh"], input=PROBE)
    c.sh("sed -e 's|^ExecStart=.*|ExecStart=/bin/sh /usr/local/lib/sandboxd-probe.sh|' "
         "-e 's|^Type=notify|Type=oneshot|' -e '/^WatchdogSec=/d' -e '/^Requires=/d' "
         "-e '/^Restart=/d' -e '/^Also=/d' /usr/local/lib/systemd/system/sandboxd.service "
         "> /run/systemd/system/sbx-probe.service && systemctl daemon-reload")
    try:
        res = c.run(["systemctl", "start", "sbx-probe.service"], check=False)
        log = c.run(["journalctl", "-u", "sbx-probe.service", "-o", "cat", "--no-pager"]).stdout
        assert res.returncode == 0, log + res.stderr + hardening_culprits(c)
        sub = re.search(r"^sandboxd:(\d+):", c.read("/etc/subuid"), re.M)
        assert sub and re.search(rf"^\s*0\s+{sub.group(1)}\s+\d+$", log, re.M), log
        for step in ("cgroup-ok", "overlay-ok", "proc-ok", "devpts-ok", "hostname-ok"):
            assert step in log.split(), log
    finally:
        c.sh("rm -f /run/systemd/system/sbx-probe.service /usr/local/lib/sandboxd-probe.sh; "
             "systemctl daemon-reload")


# The [Service] settings of the unit that restrict what the daemon (and newuidmap) may do.
HARDENING = re.compile(r"^(Protect\w+|Private\w+|Restrict\w+|RemoveIPC|KeyringMode|"
                       r"LockPersonality|SystemCall\w+|CapabilityBoundingSet|NoNewPrivileges|"
                       r"SecureBits|MemoryDenyWriteExecute|ProcSubset)=.*$", re.M)


def hardening_culprits(box: nspawn.Container) -> str:
    """Which single hardening setting of the installed unit stops newuidmap from mapping a user
    namespace (each tried alone in a transient unit), with the versions involved: a new systemd
    or shadow in the tree (a rebuilt cache, a point release) must fail with a name, not a
    mystery errno."""
    unit = box.read("/usr/local/lib/systemd/system/sandboxd.service")
    probe = ["sh", "-c", "unshare --user --map-users=auto --map-groups=auto --fork true"]
    found = []
    for setting in [m.group(0) for m in HARDENING.finditer(unit)]:
        res = box.run(["systemd-run", "--wait", "--pipe", "--quiet", "-p", "User=sandboxd",
                       "-p", setting, *probe], check=False)
        if res.returncode != 0:
            found.append(f"  {setting}: {(res.stdout + res.stderr).strip()}")
    versions = box.run(["dpkg-query", "-W", "systemd", "uidmap", "libseccomp2"],
                       check=False).stdout.strip().replace("\n", ", ")
    return ("\nsettings of sandboxd.service that alone break newuidmap in this tree ("
            f"{versions}):\n"
            + ("\n".join(found) or "  none alone: a combination, or not the unit"))


def test_outsider_is_refused_by_the_socket(c: nspawn.Container) -> None:
    code, out, err = ctl(c, "ping", user=OUTSIDER, check=False)
    assert code != 0 and "ermission denied" in out + err, (code, out, err)
    # The group member is fine, and so is root.
    ctl(c, "ping")
    ctl(c, "ping", user="root")


def test_watchdog_keeps_a_healthy_daemon_alive(c: nspawn.Container) -> None:
    restarts = show(c, "NRestarts")
    c.sh("mkdir -p /run/systemd/system/sandboxd.service.d && printf '[Service]\\nWatchdogSec=1s\\n'"
         " > /run/systemd/system/sandboxd.service.d/watchdog.conf && systemctl daemon-reload"
         " && systemctl restart sandboxd.service")
    try:
        assert show(c, "WatchdogUSec") == "1s"
        time.sleep(3.5)  # three watchdog periods
        assert show(c, "ActiveState") == "active"
        assert show(c, "NRestarts") == restarts
        assert show(c, "Result") == "success"
    finally:
        c.sh("rm -rf /run/systemd/system/sandboxd.service.d && systemctl daemon-reload")


def test_stop_leaves_no_room_behind(c: nspawn.Container) -> None:
    # The tests above restarted the unit often; let StartLimitBurst= count from here, or the
    # socket-triggered start below hits the start limit (and the socket unit fails with it).
    c.run(["systemctl", "reset-failed", "sandboxd.service", "sandboxd.socket"])
    ctl(c, "exec", "r2", "--", "true")
    hold(c, "r3")
    c.run(["systemctl", "stop", "sandboxd.service"])
    assert show(c, "Result") == "success"
    assert leftovers(c) == NOTHING
    # The socket outlives the service, and the next client starts it again.
    assert show(c, "ActiveState", "sandboxd.socket") == "active"
    ctl(c, "ping")
    wait_active(c)


def test_sigkill_then_restart_reconciles(c: nspawn.Container) -> None:
    ctl(c, "exec", "k1", "--", "true")
    hold(c, "k2")
    before = leftovers(c)
    assert before["state"], "rooms should have state while running"
    restarts = int(show(c, "NRestarts"))
    c.run(["systemctl", "reset-failed", "sandboxd.service", "sandboxd.socket"])
    c.run(["systemctl", "kill", "-s", "KILL", "sandboxd.service"])
    start = time.monotonic()
    # Restart=on-failure brings it back by itself (RestartSec=1s).
    wait_active(c, 30, NRestarts=str(restarts + 1))
    TIMINGS["SIGKILL to active again s"] = time.monotonic() - start
    _, out, _ = ctl(c, "rooms")
    assert "k1" not in out and "k2" not in out
    assert leftovers(c)["state"] == [], "state of dead rooms was not reconciled"
    cgroups = [p for p in leftovers(c)["cgroups"] if not p.endswith("/supervisor")]
    assert cgroups == [], cgroups
    ctl(c, "exec", "k3", "--", "echo", "alive")
    c.run(["systemctl", "stop", "sandboxd.service"])
    assert leftovers(c) == NOTHING
