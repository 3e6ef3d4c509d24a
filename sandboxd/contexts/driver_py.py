# sandboxd: the Python code-context driver. Runs INSIDE the room as `python3 -c <this file>`,
# with the room's own python3 (the Debian packages python3-ipykernel and python3-jupyter-client of
# the room's tree): it starts one ipykernel and drives it with jupyter_client over ipc (Unix
# socket) transport in a private temporary directory, so no port and no network is involved.
#
# It speaks to the daemon in JSON lines. In, on fd 0:
#   {"op": "run", "id": N, "code": "..."}   {"op": "interrupt"}   {"op": "restart", "id": N}
# Out, on a private dup of the original fd 1 (fds 0 and 1 are then /dev/null and stderr, so
# nothing the kernel or its children write by fd can reach the channel):
#   {"ev": "ready"}
#   {"ev": "out", "id": N, "stream": "stdout"|"stderr", "text": "..."}
#   {"ev": "result", "id": N, "data": {mime: value}}
#   {"ev": "done", "id": N, "count": C, "error": null | {"name", "value", "traceback"}}
#   {"ev": "restarted", "id": N, "reason": "..."}   (a restart asked for, or a kernel that died)
# The daemon trusts none of it beyond parsing bounded JSON: this is code in the room.
import json
import os
import queue
import re
import select
import shutil
import sys
import tempfile
import time
from typing import Any

CHAN = os.dup(1)
os.set_inheritable(CHAN, False)
CMD = os.dup(0)
os.set_inheritable(CMD, False)
_null = os.open(os.devnull, os.O_RDWR)
os.dup2(_null, 0)
os.dup2(2, 1)
os.close(_null)
sys.stdin = open(os.devnull)  # noqa: SIM115
sys.stdout = sys.stderr

from jupyter_client import KernelManager  # noqa: E402

MIMES = ("text/plain", "text/html", "image/png", "image/jpeg", "image/svg+xml",
         "application/json", "text/markdown", "text/latex", "application/javascript")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
WORK = tempfile.mkdtemp(prefix="sbx-ctx-")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(WORK, "mpl"))
os.environ.setdefault("IPYTHONDIR", os.path.join(WORK, "ipython"))
os.environ["JUPYTER_RUNTIME_DIR"] = os.path.join(WORK, "runtime")
os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
# Debian's matplotlib reads its defaults from /etc/matplotlibrc, which a room's own /etc (over
# the host tree) lacks: the copy in mpl-data, or an empty file (the built-in defaults).
if "MATPLOTLIBRC" not in os.environ and not os.path.exists("/etc/matplotlibrc"):
    _rc = "/usr/share/matplotlib/mpl-data/matplotlibrc"
    if not os.path.exists(_rc):
        _rc = os.path.join(WORK, "matplotlibrc")
        open(_rc, "w").close()
    os.environ["MATPLOTLIBRC"] = _rc

# Plots show at the end of a cell or on plt.show() as PNG (matplotlib_inline's default); the
# figure is closed after it is shown, so a figure is never sent twice.
STARTUP = "get_ipython().run_line_magic('matplotlib', 'inline')\n"


def send(obj: dict[str, Any]) -> None:
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    view = memoryview(data)
    while view:
        n = os.write(CHAN, view)
        view = view[n:]


class Commands:
    def __init__(self) -> None:
        self.buf = b""
        self.pending: list[dict[str, Any]] = []

    def poll(self, timeout: float | None) -> list[dict[str, Any]]:
        """Lines from the daemon read within ``timeout`` (0: only what is there)."""
        ready, _, _ = select.select([CMD], [], [], timeout)
        if ready:
            chunk = os.read(CMD, 1 << 20)
            if not chunk:
                raise SystemExit(0)  # the daemon closed our stdin: the context is deleted
            self.buf += chunk
            *lines, self.buf = self.buf.split(b"\n")
            for line in lines:
                if line.strip():
                    cmd = json.loads(line)
                    if isinstance(cmd, dict):
                        self.pending.append(cmd)
        out, self.pending = self.pending, []
        return out


class Kernel:
    def __init__(self) -> None:
        self.km: Any = None
        self.kc: Any = None

    def start(self) -> None:
        km = KernelManager(transport="ipc", ip=os.path.join(WORK, "k"))
        km.kernel_name = "python3"
        km.start_kernel(extra_arguments=["--HistoryManager.enabled=False",
                                         "--IPKernelApp.trio_loop=False"],
                        cwd=os.getcwd())
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        self.km, self.kc = km, kc
        pid = self.pid()
        if pid:
            try:  # the kernel, not this driver, is what an OOM in the run should kill
                with open(f"/proc/{pid}/oom_score_adj", "w") as f:
                    f.write("1000")
            except OSError:
                pass
        self.execute_quiet(STARTUP)

    def pid(self) -> int | None:
        prov = getattr(self.km, "provisioner", None)
        proc = getattr(prov, "process", None) if prov is not None else None
        pid = getattr(proc, "pid", None)
        return pid if isinstance(pid, int) else None

    def execute_quiet(self, code: str) -> None:
        mid = self.kc.execute(code, silent=True, store_history=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if (msg["parent_header"].get("msg_id") == mid and msg["msg_type"] == "status"
                    and msg["content"].get("execution_state") == "idle"):
                return

    def stop(self) -> None:
        try:
            if self.kc is not None:
                self.kc.stop_channels()
            if self.km is not None:
                self.km.shutdown_kernel(now=True)
        except Exception:  # noqa: BLE001 - it is being replaced anyway
            pass
        self.km = self.kc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.km is not None and bool(self.km.is_alive())


def bundle(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k in MIMES and isinstance(v, (str, dict, list))}


def run_cell(kernel: Kernel, cmds: Commands, cid: Any, code: str) -> None:
    """Run one cell, forwarding its output; the daemon may interrupt or restart meanwhile."""
    mid = kernel.kc.execute(code, store_history=True, allow_stdin=False)
    count = None
    error = None
    last_alive = time.monotonic()
    while True:
        for cmd in cmds.poll(0):
            if cmd.get("op") == "interrupt":
                kernel.km.interrupt_kernel()
            elif cmd.get("op") == "restart":
                kernel.restart()
                send({"ev": "restarted", "id": cid, "reason": "restart"})
                return
            elif cmd.get("op") == "run":  # one cell at a time: the daemon serialises
                send({"ev": "done", "id": cmd.get("id"), "count": None,
                      "error": {"name": "ContextBusy", "value": "a cell is running",
                                "traceback": []}})
        try:
            msg = kernel.kc.get_iopub_msg(timeout=0.05)
        except queue.Empty:
            now = time.monotonic()
            if now - last_alive > 0.25:
                last_alive = now
                if not kernel.alive():
                    kernel.restart()
                    send({"ev": "restarted", "id": cid, "reason": "died"})
                    return
            continue
        if msg["parent_header"].get("msg_id") != mid:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            send({"ev": "out", "id": cid, "stream": "stderr" if content.get("name") == "stderr"
                  else "stdout", "text": content.get("text", "")})
        elif kind in ("execute_result", "display_data"):
            send({"ev": "result", "id": cid, "data": bundle(content.get("data", {}))})
            if kind == "execute_result":
                count = content.get("execution_count", count)
        elif kind == "execute_input":
            count = content.get("execution_count", count)
        elif kind == "error":
            error = {"name": content.get("ename", "Error"), "value": content.get("evalue", ""),
                     "traceback": [ANSI.sub("", t) for t in content.get("traceback", [])]}
        elif kind == "status" and content.get("execution_state") == "idle":
            send({"ev": "done", "id": cid, "count": count, "error": error})
            return


def main() -> None:
    cmds = Commands()
    kernel = Kernel()
    try:
        kernel.start()
        send({"ev": "ready"})
        while True:
            for cmd in cmds.poll(None):
                op = cmd.get("op")
                if op == "run":
                    run_cell(kernel, cmds, cmd.get("id"), str(cmd.get("code", "")))
                elif op == "restart":
                    kernel.restart()
                    send({"ev": "restarted", "id": cmd.get("id"), "reason": "restart"})
                # "interrupt" between cells: nothing to interrupt
    finally:
        kernel.stop()
        shutil.rmtree(WORK, ignore_errors=True)


main()
