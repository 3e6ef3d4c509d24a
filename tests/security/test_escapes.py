"""Escape attempts from inside a room, one test per escape class (PEERS.md "Escape classes").

Every attack runs as a payload (room root unless said otherwise: uid 0 of the room, no
capabilities, seccomp, no_new_privs) and every test asserts two things: the attack fails in the
room, and the host is unchanged (a planted secret never comes back, host files and processes are
as they were). Where an attack needs a foothold on the host to be meaningful (signals and ptrace
between rooms, "after an escape"), the host side is played by a process running under the room's
own host uid (``as_host_uid``): the ids a room is given are the last wall.

File-API tricks (symlinks, hard links, ``..``) live in test_file_escapes.py (the files colleague's);
the exhaustion attacks with their neighbour latencies in test_exhaustion.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sec_helpers as h
from conftest import skip_unless_ci
from sec_helpers import as_host_uid, client_of, daemon_pid, proc_uids, slice_range, wait_for_pids

from sandboxd import errors
from sandboxd.rooms import room_key

# The suite's shared fixtures, bound by name (sec_helpers says why this is not a conftest.py).
sec_user = h.sec_user
client_users = h.client_users
sec_daemon = h.sec_daemon
sec_client = h.sec_client
rooms = h.rooms

pytestmark = [pytest.mark.security, pytest.mark.integration]
# The room's users: single-id mode maps only the room's root (``sandbox`` is refused there).
USERS = ("root", "sandbox") if h.ID_MODE == "subordinate" else ("root",)


def py(sb: Any, code: str, user: str | None = None, timeout: float = 30) -> Any:
    """Run Python in the room; the code prints one JSON value last."""
    r = sb.exec("python3", ["-c", code], user=user, timeout=timeout)
    assert r.status in ("OK", "RE"), (r.status, r.stderr)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


PRELUDE = r"""
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sysc(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a
                                          for a in args])
    return 0 if r >= 0 else ctypes.get_errno()
def tryread(p):
    try:
        with open(p, 'rb') as f:
            return f.read(65536).decode('latin1')
    except OSError as e:
        return 'ERR:' + errno.errorcode[e.errno]
def trywrite(p, data):
    try:
        with open(p, 'w') as f:
            f.write(data)
        return 'OK'
    except OSError as e:
        return 'ERR:' + errno.errorcode[e.errno]
"""


class Secret:
    """A token planted on the host where an escape would find it."""

    def __init__(self, daemon: Any) -> None:
        self.token = "SBXSECRET-" + secrets.token_hex(12)
        tag = secrets.token_hex(4)
        self.root_file = f"/root/sbx-sec-{tag}"
        self.tmp_file = f"/tmp/sbx-sec-{tag}"
        self.state_file = os.path.join(daemon.state_dir, f"sbx-sec-{tag}")
        for path, mode, owner in ((self.root_file, 0o600, 0), (self.tmp_file, 0o644, 0),
                                  (self.state_file, 0o600, daemon.user.pw_uid)):
            Path(path).write_text(self.token)
            os.chmod(path, mode)
            os.chown(path, owner, owner)
        self.files = [self.root_file, self.tmp_file, self.state_file]

    def intact(self) -> None:
        for path in self.files:
            assert Path(path).read_text() == self.token, f"host file {path} changed"

    def cleanup(self) -> None:
        for path in self.files:
            with contextlib.suppress(OSError):
                os.unlink(path)


@pytest.fixture
def secret(sec_daemon: Any) -> Iterator[Secret]:
    s = Secret(sec_daemon)
    yield s
    s.intact()
    s.cleanup()


def room_host_uid(sb: Any, user: str | None = None) -> int:
    """The host uid the room's root (or ``user``) runs as, from its uid_map."""
    inside, outside, _count = sb.exec("cat /proc/self/uid_map").stdout.split()[:3]
    assert inside == "0"
    return int(outside) + (1000 if user == "sandbox" else 0)


def init_host_pid(daemon: Any, room: str) -> int:
    meta = json.loads(Path(daemon.state_dir, "rooms", room_key(0, room), "room.json").read_text())
    return int(meta["initPid"])


# --- identities ----------------------------------------------------------------------------


@pytest.mark.subordinate_ids
def test_rooms_are_distinct_subordinate_host_users(sec_daemon: Any, sec_client: Any,
                                                   rooms: Any) -> None:
    a, b = rooms(2)
    lo, hi = slice_range(sec_daemon)
    ua, ub = room_host_uid(a), room_host_uid(b)
    daemon_uid = sec_daemon.user.pw_uid
    assert ua != ub and daemon_uid not in (ua, ub)
    assert lo <= ua < hi and lo <= ub < hi
    assert abs(ua - ub) >= 4096, "slices must not overlap"
    # The payload's real host ids, seen from the host (not only what the room claims).
    marker = f"idcheck-{secrets.token_hex(4)}"
    def run() -> None:
        with client_of(sec_daemon) as c:
            c.sandbox(a.id).exec(f"exec python3 -c 'import time; time.sleep(5)' {marker}",
                                 timeout=10)

    t = threading.Thread(target=run)
    t.start()
    try:
        pid = wait_for_pids(marker)[0]
        assert set(proc_uids(pid)) == {ua}
        groups = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith("Groups:")]
        assert groups[0].split(":", 1)[1].split() == [], "a room must carry no host groups"
    finally:
        os.kill(pid, signal.SIGTERM)
        t.join()
    # user "sandbox" is uid 1000 of the room: slice base + 1000 on the host.
    r = a.exec("id -u; cat /proc/self/uid_map", user="sandbox")
    assert r.stdout.split()[0] == "1000"
    caps = sec_client.ping()["capabilities"]
    assert caps["idMapping"] == "subordinate" and caps["idSlices"]["sandboxUser"] is True


def test_daemon_and_room_init_are_not_dumpable(sec_daemon: Any, rooms: Any) -> None:
    """bubblewrap PR #114: a same-uid process must not ptrace set-up code or read its memory."""
    (sb,) = rooms(1)
    sb.exec("true")
    dpid = daemon_pid(sec_daemon)
    ipid = init_host_pid(sec_daemon, sb.id)
    probe = PRELUDE + rf"""
PTRACE_ATTACH = 16
out = {{}}
for name, pid in (('daemon', {dpid}), ('init', {ipid})):
    out[name] = {{'environ': tryread('/proc/%d/environ' % pid)[:40],
                  'mem': tryread('/proc/%d/mem' % pid)[:40],
                  'ptrace': sysc(101, PTRACE_ATTACH, pid, 0, 0)}}
print(json.dumps(out))
"""
    # As the daemon's own uid (the daemon) and as the room's root host uid (the init).
    for uid, name in ((sec_daemon.user.pw_uid, "daemon"), (room_host_uid(sb), "init")):
        res = as_host_uid(uid, probe)
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)[name]
        assert got["environ"] == "ERR:EACCES", got
        assert got["mem"] == "ERR:EACCES", got
        assert got["ptrace"] == 1, got  # EPERM


def test_seccomp_is_in_force_in_every_payload(rooms: Any) -> None:
    (sb,) = rooms(1)
    for user in USERS:
        r = sb.exec("grep -E '^(Seccomp|NoNewPrivs|CapEff|CapBnd|CapPrm):' /proc/self/status;"
                    " sh -c 'grep ^Seccomp: /proc/self/status'", user=user)
        lines = dict(line.split(":\t") for line in r.stdout.splitlines()[:5])
        assert lines == {"CapPrm": "0000000000000000", "CapEff": "0000000000000000",
                         "CapBnd": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}, r.stdout
        assert r.stdout.splitlines()[5] == "Seccomp:\t2"  # inherited by grandchildren


# --- class 2: /proc ------------------------------------------------------------------------


def test_proc_does_not_reach_the_host(sec_daemon: Any, rooms: Any, secret: Secret) -> None:
    (sb,) = rooms(1)
    before = Path("/proc/sys/kernel/core_pattern").read_text()
    out = py(sb, PRELUDE + rf"""
import glob
out = {{}}
out['root_tmp'] = tryread('/proc/1/root{secret.tmp_file}')
out['root_state'] = tryread('/proc/1/root{secret.state_file}')
out['pids'] = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
others = [p for p in glob.glob('/proc/[0-9]*') if p != '/proc/%d' % os.getpid()]
out['environ'] = [tryread(p + '/environ') for p in others]
out['cmdline'] = [tryread(p + '/cmdline') for p in others]
try:
    out['init_fd'] = os.listdir('/proc/1/fd')
except OSError as e:
    out['init_fd'] = 'ERR:' + errno.errorcode[e.errno]
out['init_fd_links'] = []
for fd in range(64):
    try:
        out['init_fd_links'].append(os.readlink('/proc/1/fd/%d' % fd))
    except OSError:
        pass
out['init_mem'] = tryread('/proc/1/mem')[:20]
out['init_environ'] = tryread('/proc/1/environ')[:20]
masked = ['kcore', 'keys', 'key-users', 'timer_list', 'sched_debug', 'sysrq-trigger',
          'kallsyms', 'kmsg', 'iomem', 'slabinfo']
out['masked'] = {{n: tryread('/proc/' + n)[:40] for n in masked}}
out['w_masked'] = {{n: trywrite('/proc/' + n, 'h') for n in masked}}
out['w_sys'] = trywrite('/proc/sys/kernel/core_pattern', '|/tmp/pwn')
out['w_hostname'] = trywrite('/proc/sys/kernel/hostname', 'pwned')
out['sys'] = os.path.exists('/sys/kernel') or os.path.exists('/sys/fs/cgroup')
print(json.dumps(out))
""")
    assert secret.token not in json.dumps(out)
    assert out["root_tmp"] in ("ERR:EACCES", "ERR:ENOENT"), out["root_tmp"]
    assert out["root_state"] in ("ERR:EACCES", "ERR:ENOENT"), out["root_state"]
    # Only the room's own processes: the init, this python, nothing of the host.
    assert out["pids"][0] == 1 and len(out["pids"]) <= 4, out["pids"]
    assert daemon_pid(sec_daemon) not in out["pids"], out["pids"]
    for text in out["environ"] + out["cmdline"]:
        assert sec_daemon.user.pw_name not in text and sec_daemon.state_dir not in text
    assert out["init_fd"] == "ERR:EACCES" and out["init_fd_links"] == []
    assert out["init_mem"] == "ERR:EACCES" and out["init_environ"] == "ERR:EACCES"
    for name, text in out["masked"].items():
        assert text in ("", "ERR:ENOENT"), (name, text)
    for name, res in out["w_masked"].items():
        assert res in ("ERR:EROFS", "ERR:ENOENT", "ERR:EACCES"), (name, res)
    assert out["w_sys"] == "ERR:EROFS" and out["w_hostname"] == "ERR:EROFS"
    assert out["sys"] is False
    assert Path("/proc/sys/kernel/core_pattern").read_text() == before


# --- class 3: ptrace and signals across rooms --------------------------------------------


@pytest.fixture
def victim(sec_daemon: Any, rooms: Any) -> Iterator[tuple[Any, int, str]]:
    """A long-running process in a room of its own: (room, host pid, marker)."""
    (sb,) = rooms(1)
    marker = f"victim-{secrets.token_hex(4)}"
    result: dict[str, Any] = {}

    def run() -> None:
        with client_of(sec_daemon) as c:  # its own connection: the sync client is not re-entrant
            result["r"] = c.sandbox(sb.id).exec(
                f"exec python3 -c 'import time; time.sleep(30)' {marker}", timeout=40)

    t = threading.Thread(target=run)
    t.start()
    pid = wait_for_pids(marker)[0]
    yield sb, pid, marker
    alive = Path(f"/proc/{pid}").exists()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    t.join(20)
    assert alive, f"victim died early: {result}"
    assert result["r"].signal == "SIGTERM", "the victim must die only at our hand"


@pytest.mark.subordinate_ids
def test_ptrace_of_another_room_fails(rooms: Any, victim: tuple[Any, int, str]) -> None:
    _, vpid, marker = victim
    (attacker,) = rooms(1)
    # Inside its room the attacker cannot even name the victim...
    out = py(attacker, PRELUDE + f"""
seen = [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()
        and b'{marker}' in open('/proc/%s/cmdline' % p, 'rb').read()]
print(json.dumps({{'seen': seen, 'ptrace': sysc(101, 16, {vpid}, 0, 0)}}))
""")
    assert out["seen"] == []
    assert out["ptrace"] in (1, 3)  # EPERM / ESRCH: not its process, whatever that pid is here
    # ...and after an escape its host uid still owns nothing of the victim's room.
    res = as_host_uid(room_host_uid(attacker), PRELUDE + f"""
import signal
iov = (ctypes.c_char * 8)()
print(json.dumps({{'ptrace': sysc(101, 16, {vpid}, 0, 0), 'seize': sysc(101, 0x4206, {vpid}, 0, 0),
                  'environ': tryread('/proc/{vpid}/environ')[:20],
                  'mem': tryread('/proc/{vpid}/mem')[:20]}}))
""")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got == {"ptrace": 1, "seize": 1, "environ": "ERR:EACCES", "mem": "ERR:EACCES"}, got
    assert Path(f"/proc/{vpid}").exists()


@pytest.mark.subordinate_ids  # single-id: the room's host uid is the daemon's (SINGLE_COST)
def test_signals_reach_neither_daemon_init_nor_other_rooms(
        sec_daemon: Any, rooms: Any, victim: tuple[Any, int, str]) -> None:
    vroom, vpid, _ = victim
    (attacker,) = rooms(1)
    attacker.exec("true")
    dpid = daemon_pid(sec_daemon)
    ipid_victim = init_host_pid(sec_daemon, vroom.id)
    # In the room: SIGKILL to its own init (PID 1 ignores signals from its namespace without a
    # handler), to every process it can see, to the host pids of the daemon and victim.
    r = attacker.exec(f"kill -KILL 1; kill -TERM 1; kill -STOP 1; kill -KILL {dpid} {vpid} "
                      f"{ipid_victim} 2>&1; kill -KILL -1; echo survived")
    assert "survived" in r.stdout or r.signal == "SIGKILL"
    assert attacker.exec("echo alive").stdout == "alive\n"  # the room's init is untouched
    # After an escape: the attacker's host uid signals the daemon, the zygote, the victim's
    # init and the victim.
    zygote = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == dpid]
    targets = {"daemon": dpid, "victim": vpid, "victim_init": ipid_victim,
               **{f"zygote{i}": z for i, z in enumerate(zygote)}}
    res = as_host_uid(room_host_uid(attacker), PRELUDE + f"""
import signal
out = {{}}
for name, pid in {targets!r}.items():
    try:
        os.kill(pid, 0)
        out[name] = 'DELIVERABLE'
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
print(json.dumps(out))
""")
    got = json.loads(res.stdout)
    assert set(got.values()) == {"EPERM"}, got
    for pid in targets.values():
        assert Path(f"/proc/{pid}").exists()
    with client_of(sec_daemon) as c:
        assert c.ping()["version"]


# --- class 4: kernel objects namespaces do not isolate -------------------------------------


def test_keyctl_is_refused(rooms: Any) -> None:
    (sb,) = rooms(1)
    out = py(sb, PRELUDE + r"""
KEY_SPEC_SESSION_KEYRING = -3
out = {
  'add_key': sysc(248, b'user', b'sbx-planted', b'secret', 6, KEY_SPEC_SESSION_KEYRING),
  'request_key': sysc(249, b'user', b'sbx-planted', None, 0),
  'keyctl_get': sysc(250, 0, KEY_SPEC_SESSION_KEYRING, 0),
  'keyctl_join': sysc(250, 1, b'sbx-ring'),
}
print(json.dumps(out))
""")
    assert set(out.values()) == {1}, out  # EPERM everywhere
    # The host's view of every keyring (root reads them all): nothing planted from the room.
    assert "sbx-planted" not in Path("/proc/keys").read_text()


# --- class 5: nested namespaces and mounts -------------------------------------------------


def test_nested_userns_and_mount_fail(rooms: Any, secret: Secret) -> None:
    (sb,) = rooms(1)
    r = sb.exec("unshare -U -r id; unshare -m true; mount -t tmpfs none /tmp; "
                "mount --bind /proc /tmp; echo done")
    # Nothing but the final echo reaches stdout: a nested `unshare -U -r id` that worked would
    # print its uid=0 line; both unshares must fail with EPERM.
    assert r.stdout == "done\n", r
    assert r.stderr.count("unshare failed: Operation not permitted") == 2, r.stderr
    out = py(sb, PRELUDE + r"""
import signal
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET = 0x10000000, 0x00020000, 0x40000000
def clone(flags):
    r = libc.syscall(ctypes.c_long(56), ctypes.c_long(flags | signal.SIGCHLD), 0, 0, 0, 0)
    if r == 0:
        os._exit(0)
    if r > 0:
        os.waitpid(r, 0)
        return 0
    return ctypes.get_errno()
# A namespace fd of its own (the init's are not readable): setns is really tried, and without
# the filter joining its own net namespace would succeed (0), not EPERM.
fd = os.open('/proc/self/ns/net', os.O_RDONLY)
out = {
  'unshare_user': sysc(272, CLONE_NEWUSER), 'unshare_ns': sysc(272, CLONE_NEWNS),
  'clone_user': clone(CLONE_NEWUSER), 'clone_net': clone(CLONE_NEWNET),
  'clone3': sysc(435, 0, 0),
  'setns': sysc(308, fd, 0),
  'mount': sysc(165, b'none', b'/tmp', b'tmpfs', 0, None),
  'umount_proc': sysc(166, b'/proc/sys', 2),
  'fsopen': sysc(430, b'tmpfs', 0),
  'open_tree': sysc(428, -100, b'/', 1),
}
print(json.dumps(out))
""")
    assert out.pop("clone3") == 38  # ENOSYS: glibc falls back to clone, which is checked
    assert set(out.values()) == {1}, out
    # The masks are still there after every attempt.
    assert sb.exec("cat /proc/sys/kernel/hostname > /proc/sys/kernel/hostname").exit_code != 0


# --- the "shocker" escape ------------------------------------------------------------------


def test_open_by_handle_at_is_refused(rooms: Any, secret: Secret) -> None:
    (sb,) = rooms(1)
    out = py(sb, PRELUDE + r"""
import struct
class FH(ctypes.Structure):
    _fields_ = [('bytes', ctypes.c_uint), ('type', ctypes.c_int), ('h', ctypes.c_ubyte * 8)]
fh = FH(8, 1)  # FILEID_INO32_GEN: inode 2 (an ext4 root), generation 0 — what shocker forged
struct.pack_into('<II', fh.h, 0, 2, 0)
mid = ctypes.c_int()
root = os.open('/', os.O_RDONLY)
out = {
  'name_to_handle': sysc(303, -100, b'/etc/hostname', ctypes.byref(FH(8)), ctypes.byref(mid), 0),
  'open_by_handle': sysc(304, root, ctypes.byref(fh), os.O_RDONLY),
}
print(json.dumps(out))
""")
    assert out == {"name_to_handle": 1, "open_by_handle": 1}, out


# --- device nodes and setuid --------------------------------------------------------------


def test_device_nodes_cannot_be_created_or_used(rooms: Any) -> None:
    (sb,) = rooms(1)
    out = py(sb, PRELUDE + r"""
import stat
out = {}
for path in ('/tmp/sda', '/dev/sda2', '/workspace/mem'):
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 1))  # /dev/mem
        out[path] = 'CREATED'
    except OSError as e:
        out[path] = errno.errorcode[e.errno]
out['dev'] = sorted(os.listdir('/dev'))
print(json.dumps(out))
""")
    assert out.pop("/tmp/sda") == out.pop("/workspace/mem") == "EPERM"
    assert out.pop("/dev/sda2") == "EROFS"  # /dev is read-only once built (issue 10, L6)
    assert set(out["dev"]) <= {"null", "zero", "full", "random", "urandom", "tty", "pts",
                               "ptmx", "shm", "fd", "stdin", "stdout", "stderr"}, out["dev"]


@pytest.mark.subordinate_ids
def test_setuid_binaries_gain_nothing(rooms: Any) -> None:
    (sb,) = rooms(1)
    # Root of the room plants setuid-root copies on every writable mount...
    r = sb.exec("for d in /tmp /workspace /dev/shm /home/sandbox; do cp /usr/bin/id $d/suid "
                "&& chmod 4755 $d/suid; done; ls -l /tmp/suid")
    assert "rwsr-xr-x" in r.stdout, r
    # ...and the unprivileged user runs them, and the host's own setuid binaries.
    r = sb.exec("for d in /tmp /workspace /dev/shm /home/sandbox; do $d/suid -u; done; "
                "su -c 'id -u' root </dev/null; sudo -n id -u; "
                "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status", user="sandbox")
    lines = r.stdout.split()
    assert lines[:4] == ["1000"] * 4, r
    assert "0" not in lines[4:-4], r
    status = dict(re.findall(r"^(CapEff|NoNewPrivs):\s*(\S+)$", r.stdout, re.M))
    assert status == {"CapEff": "0" * 16, "NoNewPrivs": "1"}, r


# --- the runtime tree ----------------------------------------------------------------------


def test_runtime_tree_is_read_only(rooms: Any) -> None:
    (sb,) = rooms(1)
    marker = f"sbx-{secrets.token_hex(4)}"
    for user in USERS:
        r = sb.exec(f"touch /usr/bin/{marker}; echo x >> /usr/lib/os-release; "
                    f"mkdir /lib/{marker}; rm -f /usr/bin/id; echo end", user=user)
        assert r.stdout == "end\n"
        assert r.stderr.count("Read-only file system") >= 3, r.stderr
    assert not Path(f"/usr/bin/{marker}").exists() and Path("/usr/bin/id").exists()
    assert sb.exec("id -u").stdout == "0\n"


def test_built_tree_root_is_read_only(sec_user: Any) -> None:
    from sec_helpers import start_daemon, stop_and_check

    tree = "/var/lib/sandboxd/rootfs/default"
    if not os.path.isdir(f"{tree}/usr"):
        skip_unless_ci("no built runtime tree")
    d = start_daemon(sec_user, rootfs=tree)
    try:
        with client_of(d) as c:
            r = c.sandbox("tree").exec("touch /etc/x /opt/x /usr/x; echo ok > /workspace/w; "
                                       "cat /workspace/w; grep ' / ' /proc/self/mounts")
            assert r.stdout.startswith("ok\n") and r.stderr.count("Read-only file system") == 3
            assert " ro," in r.stdout and "nosuid" in r.stdout
            c.sandbox("tree").destroy()
    finally:
        stop_and_check(d)


# --- sockets: the daemon's and the host's --------------------------------------------------


def test_no_host_socket_is_reachable(sec_daemon: Any, rooms: Any) -> None:
    (sb,) = rooms(1)
    tag = secrets.token_hex(4)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(f"\0sbx-{tag}")
    abstract.listen()
    path = f"/tmp/sbx-{tag}.sock"
    named = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    named.bind(path)
    os.chmod(path, 0o777)
    named.listen()
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    port = tcp.getsockname()[1]
    try:
        out = py(sb, PRELUDE + rf"""
import socket, subprocess
def conn(fam, addr, typ=socket.SOCK_STREAM):
    s = socket.socket(fam, typ)
    s.settimeout(2)
    try:
        s.connect(addr)
        return 'CONNECTED'
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
out = {{
  'abstract': conn(socket.AF_UNIX, '\0sbx-{tag}'),
  'named': conn(socket.AF_UNIX, {path!r}),
  'daemon': conn(socket.AF_UNIX, {sec_daemon.socket!r}),
  'tcp_host': conn(socket.AF_INET, ('127.0.0.1', {port})),
  'tcp_out': conn(socket.AF_INET, ('1.1.1.1', 53)),
  'systemd': conn(socket.AF_UNIX, '/run/systemd/private'),
  'dbus': conn(socket.AF_UNIX, '/run/dbus/system_bus_socket'),
  'ifaces': [l.split(':')[0].strip() for l in open('/proc/self/net/dev').read().splitlines()[2:]],
}}
out['socket_files'] = subprocess.run(['find', '/', '-xdev', '-type', 's'],
                                     capture_output=True, text=True).stdout.split()
print(json.dumps(out))
""")
        for name in ("abstract", "named", "daemon", "systemd", "dbus"):
            assert out[name] in ("ECONNREFUSED", "ENOENT"), (name, out[name])
        assert out["tcp_host"] == "ECONNREFUSED"
        assert out["tcp_out"] in ("ENETUNREACH", "EHOSTUNREACH", "timed out"), out
        assert out["ifaces"] == ["lo"], out
        assert out["socket_files"] == []
        for s in (abstract, named, tcp):
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.accept()  # nobody ever got through
    finally:
        for s in (abstract, named, tcp):
            s.close()
        os.unlink(path)


# --- class 7: terminal injection -----------------------------------------------------------


def test_tiocsti_cannot_inject(rooms: Any) -> None:
    (sb,) = rooms(1)
    out = py(sb, PRELUDE + r"""
import fcntl, termios, select
out = {}
try:
    os.open('/dev/tty', os.O_RDWR)
    out['tty'] = 'OPENED'
except OSError as e:
    out['tty'] = errno.errorcode[e.errno]
m, s = os.openpty()
for name, req in (('tiocsti', termios.TIOCSTI), ('tiocsti_hi', termios.TIOCSTI | (1 << 32))):
    try:
        fcntl.ioctl(s, req, b'X')
        out[name] = 'INJECTED'
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
out['pending'] = bool(select.select([s], [], [], 0.2)[0])
out['sid_is_self'] = os.getsid(0) == os.getpid()
print(json.dumps(out))
""")
    assert out == {"tty": "ENXIO", "tiocsti": "EPERM", "tiocsti_hi": "EPERM", "pending": False,
                   "sid_is_self": True}, out


# --- class 6: scratch shared between rooms -----------------------------------------------


def test_scratch_and_ipc_are_per_room(rooms: Any) -> None:
    a, b = rooms(2)
    tok = secrets.token_hex(8)
    a.exec(f"echo {tok} > /tmp/t; echo {tok} > /dev/shm/t; echo {tok} > /workspace/t; "
           f"python3 -c 'import sys; from multiprocessing import shared_memory as s; "
           f"m = s.SharedMemory(name=\"sbx\", create=True, size=64); m.buf[:16] = b\"{tok}\"'")
    r = b.exec("cat /tmp/t /dev/shm/t /workspace/t /dev/shm/sbx; ls /dev/shm /tmp; "
               "cat /proc/sysvipc/shm 2>/dev/null")
    assert tok not in r.stdout
    assert b.exec("ls /dev/shm").stdout == ""


# --- class 12: leaks after teardown --------------------------------------------------------


def test_destroy_leaves_nothing_on_the_host(sec_daemon: Any, sec_client: Any,
                                            room_id: str) -> None:
    sb = sec_client.sandbox(f"{room_id[:40]}-gone")
    sb.exec("echo x > /dev/shm/x")
    uid = room_host_uid(sb)
    ipid = init_host_pid(sec_daemon, sb.id)
    # The room's processes: its host uid *and* its pid namespace (in single-id mode the uid is
    # the daemon's own, shared with the daemon and zygote).
    pidns = os.readlink(f"/proc/{ipid}/ns/pid")

    def in_room() -> list[str]:
        return [p for p in os.listdir("/proc") if p.isdigit() and _in_room(p, uid, pidns)]

    # A run still *running* across the teardown, with children of its own (one setsid'd):
    # a finished exec kills its leftovers itself, which would show only the init dying.
    def busy() -> None:
        with client_of(sec_daemon) as c, contextlib.suppress(errors.SandboxError):
            c.sandbox(sb.id).exec("sleep 100 & setsid sleep 100 & sleep 100", timeout=60)

    t = threading.Thread(target=busy)
    t.start()
    deadline = time.monotonic() + 10
    while len(in_room()) < 5 and time.monotonic() < deadline:  # init, sh, three sleeps
        time.sleep(0.05)
    assert len(in_room()) >= 5, in_room()
    sb.destroy()
    t.join(30)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = in_room()
        if not left:
            break
        time.sleep(0.05)
    assert not left, left
    assert not Path(f"/proc/{ipid}").exists()
    assert not Path(sec_daemon.state_dir, "rooms", room_key(0, sb.id)).exists()
    cg = [os.path.join(r, n) for r, ds, _ in os.walk("/sys/fs/cgroup/pids/sandboxd/sbxsec")
          for n in ds if sb.id in n]
    assert cg == []


def _in_room(pid: str, uid: int, pidns: str) -> bool:
    try:
        return _uid_of(pid) == uid and os.readlink(f"/proc/{pid}/ns/pid") == pidns
    except OSError:
        return False


def _ppid(pid: str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _uid_of(pid: str) -> int | None:
    try:
        return proc_uids(int(pid))[0]
    except (OSError, AssertionError):
        return None


# --- refusals ------------------------------------------------------------------------------


def test_sandbox_user_refused_with_single_mapping(room_id: str) -> None:
    """A daemon without subordinate ids maps one id: ``user: "sandbox"`` is refused up front,
    and ping says which mode is in use and what it costs."""
    from conftest import _ensure_user
    from sec_helpers import start_daemon, stop_and_check

    user = _ensure_user("sbxsingle")
    _drop_subids(user.pw_name)  # useradd may have given it a range (login.defs SUB_UID_COUNT)
    d = start_daemon(user, id_mode="single", cgroup_backend="disabled")
    try:
        with client_of(d) as c:
            caps = c.ping()["capabilities"]
            assert caps["idMapping"] == "single"
            assert "sandbox" in caps["idSlices"]["cost"] and caps["idSlices"]["reason"]
            sb = c.sandbox("single")
            assert sb.exec("id -u").stdout == "0\n"
            with pytest.raises(errors.LimitUnavailable) as err:
                sb.exec("id -u", user="sandbox")
            assert err.value.context.get("limit") == "user"
            sb.destroy()
    finally:
        stop_and_check(d)


def _drop_subids(name: str) -> None:
    from sandboxd.hostsetup import SUBGID, SUBUID, read_subids

    for path, flag in ((SUBUID, "--del-subuids"), (SUBGID, "--del-subgids")):
        for e in read_subids(path):
            if e.owner == name:
                subprocess.run(["usermod", flag, f"{e.start}-{e.end - 1}", name], check=True)


# --- a dying daemon takes its rooms down ---------------------------------------------------


def test_dying_daemon_takes_its_rooms_down(sec_user: Any) -> None:
    """PR_SET_PDEATHSIG chain: daemon -> zygote -> room inits -> (pid namespace) payloads. A
    SIGKILLed daemon must leave no room running, and its successor must start clean."""
    from sec_helpers import descendants, start_daemon, stop_and_check

    d = start_daemon(sec_user)
    try:
        with client_of(d) as c:
            c.sandbox("a").exec("true")
            c.sandbox("b").exec("(setsid sleep 300 &) ; true")
        assert d.proc is not None
        mine = descendants(d.proc.pid)
        assert len(mine) >= 3  # zygote + two inits (+ payload leftovers)
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        d.proc = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in mine):
            time.sleep(0.05)
        assert [p for p in mine if Path(f"/proc/{p}").exists()] == []
        d.start()
        with client_of(d) as c:
            assert c.list_sandboxes() == []
            assert c.sandbox("a").exec("echo again").stdout == "again\n"
            c.sandbox("a").destroy()
    finally:
        stop_and_check(d)


@pytest.mark.subordinate_ids
def test_file_api_writes_belong_to_the_rooms_root(sec_client: Any, rooms: Any) -> None:
    """Files written through the file API are the room root's (0:0 in the room, the slice base
    on the host), so the unprivileged ``sandbox`` user cannot change them."""
    (sb,) = rooms(1)
    sec_client.call("writeFile", {"sandboxId": sb.id, "path": "/workspace/owned.txt",
                                  "content": "from the API"})
    r = sb.exec("stat -c '%u %g %a' /workspace/owned.txt; echo x >> /workspace/owned.txt",
                user="sandbox")
    assert r.stdout == "0 0 644\n" and "Permission denied" in r.stderr


@pytest.mark.rootfs
def test_toolchains_run_without_sys(sec_user: Any) -> None:
    """The /sys decision (docs/security.md): no /sys at all, and the JVM and Go still start and
    size themselves (cpu count from sched_getaffinity)."""
    from sec_helpers import start_daemon, stop_and_check

    tree = "/var/lib/sandboxd/rootfs/default"
    if not os.path.isdir(f"{tree}/usr/lib/jvm") or not os.path.exists(f"{tree}/usr/bin/go"):
        skip_unless_ci("no built runtime tree with java and go")
    d = start_daemon(sec_user, rootfs=tree)
    try:
        with client_of(d) as c:
            sb = c.sandbox("sys")
            r = sb.exec("echo sys=$(ls -A /sys 2>/dev/null | wc -l); "
                        "java -XshowSettings:system -version 2>&1 | head -3; "
                        "printf 'package main\\nimport (\"fmt\";\"runtime\")\\nfunc main(){"
                        "fmt.Println(\"go\", runtime.NumCPU())}\\n' > /tmp/m.go && "
                        "cd /tmp && GOCACHE=/tmp/gc go run m.go", timeout=120)
            assert "sys=0" in r.stdout  # nothing mounted (a built tree has an empty /sys dir)
            assert "openjdk version" in r.stdout or "Operating System Metrics" in r.stdout
            assert f"go {len(os.sched_getaffinity(0))}" in r.stdout, r.stdout + r.stderr
            sb.destroy()
    finally:
        stop_and_check(d)


@pytest.mark.subordinate_ids
def test_two_daemons_of_one_user_use_different_slices(sec_user: Any, rooms: Any) -> None:
    """A second daemon of the same user (another state dir) draws from the same subordinate
    range; the slice locks keep its rooms on host ids no room of the first daemon has."""
    from sec_helpers import start_daemon, stop_and_check

    d = start_daemon(sec_user)
    try:
        # Rooms of the first daemon made *after* the second started: its start-up quarantine
        # cannot have seen them, only the locks keep the two apart.
        first = {room_host_uid(sb) for sb in rooms(2)}
        with client_of(d) as c:
            second = {room_host_uid(c.sandbox(f"other-{i}")) for i in range(2)}
            for i in range(2):
                c.sandbox(f"other-{i}").destroy()
    finally:
        stop_and_check(d)
    assert len(first) == 2 and len(second) == 2 and not first & second, (first, second)
