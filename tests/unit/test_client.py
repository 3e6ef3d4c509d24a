"""sandboxd.client against a small in-test JSON-RPC peer on a temporary Unix socket.

``FakeDaemon`` validates every request's params *and* every result it sends against
``protocol.METHODS`` (so neither the client nor this fake can drift from the wire: a result field
the schema does not declare fails the test, except the deliberate ``futureField``), answers each
request from its own task (so responses come back in completion order, not request order), keeps
files in a dict, and fakes ``exec`` with knobs carried in ``env``: DELAY (seconds before
answering), EXIT (exit code), TIMEOUT (report a timeout), CHUNKS (stream that many chunks, one
every 20 ms).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import select
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from sandboxd import errors, protocol
from sandboxd.client import AsyncClient, Client, ExecResult, FileContent, SandboxInfo

# --- the peer ----------------------------------------------------------------------------------


class FakeDaemon:
    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[dict[str, Any]] = []
        self.answered: list[Any] = []  # ids, in the order responses were written
        self.validated: set[str] = set()  # methods whose params and result passed the schema
        self.files: dict[str, bytes] = {}
        self.exposed: dict[int, dict[str, Any]] = {}
        self.failures: list[str] = []  # results of ours the schema refused
        self.rooms: dict[str, dict[str, Any]] = {
            "alpha": {"sandboxId": "alpha", "status": "ready", "createdAt": "2026-11-26T20:00:00Z",
                      "lastActivityAt": "2026-11-26T20:05:00Z"},
        }
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Future[None]] = []  # sends after an answer (watch events)

    # lifecycle (the peer runs on its own loop in a thread, so sync clients can use it too)

    def start(self) -> FakeDaemon:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=1 << 26)

    def stop(self) -> None:
        async def _stop() -> None:
            for w in self._writers:
                w.close()
            if self._server is not None:
                self._server.close()
        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def drop_connections(self) -> None:
        async def _drop() -> None:
            for w in self._writers:
                w.close()
        asyncio.run_coroutine_threadsafe(_drop(), self._loop).result(5)

    # serving

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        lock = asyncio.Lock()

        async def send(msg: Any) -> None:
            async with lock:  # raw bytes go out as they are (to test garbage lines)
                writer.write(msg if isinstance(msg, bytes) else protocol.encode(msg))
                await writer.drain()

        tasks = set()
        try:
            while line := await reader.readline():
                task = asyncio.create_task(self._line(line, send))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (ConnectionError, OSError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            writer.close()

    async def _line(self, line: bytes, send: Any) -> None:
        try:
            msg = protocol.decode(line)
        except errors.ParseError as err:
            await send(protocol.error_response(None, err))
            return
        if isinstance(msg, list):
            results = await asyncio.gather(*(self._one(m, send) for m in msg))
            await send([r for r in results if r is not None])
            return
        response = await self._one(msg, send)
        if response is not None:
            if "raw" in response:
                await send(response["raw"])
                return
            self.answered.append(response["id"])
            await send(response)

    async def _one(self, obj: Any, send: Any) -> dict[str, Any] | None:
        self.requests.append(obj)
        req_id = obj.get("id") if isinstance(obj, dict) else None
        try:
            req = protocol.parse_envelope(obj)
            if req.method == "garbage":
                return {"raw": b"this is not json\n", "id": req_id}
            if req.method == "hang":
                await asyncio.sleep(3600)
            if req.method == "nullid":
                raise errors.InvalidRequest("could not read the id")
            params = protocol.convert_params(req.method, req.params)
            result = await getattr(self, "m_" + req.method)(params, req.id, send)
            try:
                check_result(req.method, result)
            except (AssertionError, errors.ProtocolError) as err:
                self.failures.append(f"{req.method}: {err}")
                raise errors.InternalError(f"the fake broke the schema: {err}") from err
            self.validated.add(req.method)
        except errors.SandboxError as err:
            if isinstance(obj, dict) and obj.get("method") == "nullid":
                req_id = None
            return protocol.error_response(req_id, err)
        return protocol.response(req.id, result)

    # methods

    async def m_ping(self, p: protocol.PingParams, rid: Any, send: Any) -> dict[str, Any]:
        if p.sandbox_id is not None and p.sandbox_id not in self.rooms:
            raise errors.SandboxNotFound(f"no room {p.sandbox_id}", sandboxId=p.sandbox_id)
        out: dict[str, Any] = {
            "message": "pong", "version": "0.0-test", "capabilities": {
                "namespaces": ["user", "mnt"], "cgroup": {"version": "v1"}, "rootfs": "host",
                "idMapping": "single", "idSlices": {"mode": "single"},
                "seccomp": {"enabled": True}, "limits": ["wallTimeMs"]}}
        if p.sandbox_id is not None:
            out["sandbox"] = {"sandboxId": p.sandbox_id, "init": True, "runs": 0}
        return out

    async def m_listSandboxes(self, p: Any, rid: Any, send: Any) -> dict[str, Any]:
        return {"sandboxes": list(self.rooms.values())}

    async def m_getSandbox(self, p: protocol.GetSandboxParams, rid: Any,
                           send: Any) -> dict[str, Any]:
        room = self.rooms.setdefault(p.sandbox_id, {
            "sandboxId": p.sandbox_id, "status": "ready", "createdAt": "2026-11-26T21:00:00Z"})
        return {**room, "options": {"limits": {"memoryBytes": 1 << 29}}, "incarnation": 1}

    async def m_destroy(self, p: protocol.DestroyParams, rid: Any, send: Any) -> dict[str, Any]:
        if p.sandbox_id == "ghost":
            raise errors.SandboxNotFound("no room ghost", sandboxId="ghost")
        return {"sandboxId": p.sandbox_id, "destroyed": self.rooms.pop(p.sandbox_id, None)
                is not None}

    async def m_exec(self, p: protocol.ExecParams, rid: Any, send: Any) -> dict[str, Any]:
        env = p.env or {}
        self.rooms.setdefault(p.sandbox_id, {"sandboxId": p.sandbox_id, "status": "ready"})
        await asyncio.sleep(float(env.get("DELAY") or 0))
        argv = [p.command, *(p.args or [])] if p.args is not None else ["sh", "-c", p.command]
        chunks = int(env.get("CHUNKS") or 0)
        out = []
        for i in range(chunks):
            data = f"{p.sandbox_id}:{i}\n"
            out.append(data)
            if p.stream:
                stream = "stderr" if i % 2 else "stdout"
                await send(protocol.notification("exec.output", protocol.ExecOutput(
                    request_id=rid, stream=stream, data=data)))
            await asyncio.sleep(0.02)
        stdout = " ".join(argv) + "\n" + (p.stdin or "") if not chunks else "".join(out)
        if chunks and p.stream:
            stdout = ""
        timed_out = env.get("TIMEOUT") == "1"
        code = 124 if timed_out else int(env.get("EXIT") or 0)
        return {"success": code == 0, "exitCode": code, "stdout": stdout,
                "stderr": "" if chunks else "err\n", "command": " ".join(argv),
                "duration": 1.5, "timestamp": "2026-11-26T20:00:00Z", "timedOut": timed_out,
                "futureField": {"x": 1}}

    # files: kept in self.files by absolute path

    @staticmethod
    def _abs(path: str) -> str:
        return path if path.startswith("/") else f"/workspace/{path}"

    def _get(self, path: str) -> bytes:
        full = self._abs(path)
        if full not in self.files:
            raise errors.FileNotFound(f"{path}: No such file or directory", path=path)
        return self.files[full]

    async def m_writeFile(self, p: protocol.WriteFileParams, rid: Any,
                          send: Any) -> dict[str, Any]:
        import base64

        data = base64.b64decode(p.content) if p.encoding == "base64" else p.content.encode()
        full = self._abs(p.path)
        self.files[full] = (self.files.get(full, b"") if p.append else b"") + data
        return {"success": True, "path": full, "bytesWritten": len(data), "timestamp": NOW}

    async def m_readFile(self, p: protocol.ReadFileParams, rid: Any,
                         send: Any) -> dict[str, Any]:
        import base64

        data = self._get(p.path)
        enc = "utf-8" if p.encoding in ("utf-8", "utf8") else "base64"
        if p.stream:
            for off in range(0, len(data), 4):
                piece = data[off:off + 4]
                text = base64.b64encode(piece).decode() if enc == "base64" else piece.decode()
                await send(protocol.notification("file.chunk", protocol.FileChunk(
                    request_id=rid, data=text, encoding=enc, offset=off)))
            return {"success": True, "path": self._abs(p.path), "content": "",
                    "encoding": enc, "stream": True, "chunks": (len(data) + 3) // 4,
                    "size": len(data), "mimeType": "text/plain", "timestamp": NOW}
        content = base64.b64encode(data).decode() if enc == "base64" else data.decode()
        return {"success": True, "path": self._abs(p.path), "content": content,
                "encoding": enc, "isBinary": enc == "base64", "size": len(data),
                "mimeType": "text/plain", "timestamp": NOW}

    async def m_deleteFile(self, p: protocol.PathParams, rid: Any, send: Any) -> dict[str, Any]:
        self._get(p.path)
        del self.files[self._abs(p.path)]
        return {"success": True, "path": self._abs(p.path), "timestamp": NOW}

    def _move(self, src: str, dst: str) -> dict[str, Any]:
        self.files[self._abs(dst)] = self._get(src)
        del self.files[self._abs(src)]
        return {"success": True, "path": self._abs(src), "newPath": self._abs(dst),
                "timestamp": NOW}

    async def m_renameFile(self, p: protocol.RenameFileParams, rid: Any,
                           send: Any) -> dict[str, Any]:
        return self._move(p.old_path, p.new_path)

    async def m_moveFile(self, p: protocol.MoveFileParams, rid: Any,
                         send: Any) -> dict[str, Any]:
        name = p.source_path.rsplit("/", 1)[-1]
        return self._move(p.source_path, f"{p.destination_path}/{name}")

    async def m_mkdir(self, p: protocol.MkdirParams, rid: Any, send: Any) -> dict[str, Any]:
        return {"success": True, "path": self._abs(p.path), "recursive": p.recursive,
                "timestamp": NOW}

    async def m_exists(self, p: protocol.PathParams, rid: Any, send: Any) -> dict[str, Any]:
        found = self._abs(p.path) in self.files
        return {"success": True, "path": self._abs(p.path), "exists": found,
                "type": "file" if found else None}

    async def m_listFiles(self, p: protocol.ListFilesParams, rid: Any,
                          send: Any) -> dict[str, Any]:
        base = self._abs(p.path).rstrip("/") + "/"
        files = [{"name": k[len(base):], "absolutePath": k, "relativePath": k[len(base):],
                  "type": "file", "size": len(v), "modifiedAt": NOW, "mode": "rw-r--r--"}
                 for k, v in sorted(self.files.items()) if k.startswith(base)]
        return {"success": True, "path": base.rstrip("/"), "count": len(files),
                "files": files, "truncated": False, "timestamp": NOW}

    async def m_gitCheckout(self, p: protocol.GitCheckoutParams, rid: Any,
                            send: Any) -> dict[str, Any]:
        return {"success": True, "repoUrl": p.repo_url, "branch": p.branch or "main",
                "targetDir": p.target_dir or "/workspace/repo"}

    async def m_runCode(self, p: protocol.RunCodeParams, rid: Any, send: Any) -> dict[str, Any]:
        if p.language == "cobol":
            raise errors.UnsupportedLanguage("no cobol", language="cobol")
        if "syntax error" in p.code:
            return {"success": False, "language": p.language, "status": "CE", "exitCode": 1,
                    "stdout": "", "stderr": "", "compile": COMPILE_FAILED, "cached": False,
                    "cpuTimeMs": None, "wallTimeMs": None, "memoryPeakBytes": None}
        return {"success": True, "language": p.language, "exitCode": 0,
                "stdout": (p.stdin or "").upper(), "stderr": "", "compile": None,
                "cached": True, **REPORT}

    async def m_runExampleCode(self, p: protocol.RunExamplesParams, rid: Any,
                               send: Any) -> dict[str, Any]:
        return {"results": [
            {"language": "c", "name": "C", "available": True, "success": True, "status": "OK",
             "exitCode": 0, "stdout": "hi\n", "stderr": "", "compile": None, "cached": False,
             "expected": "hi\n", **REPORT},
            {"language": "go", "name": "Go", "available": False, "success": False,
             "status": None}]}

    async def m_listLanguages(self, p: Any, rid: Any, send: Any) -> dict[str, Any]:
        return {"languages": [{"id": "c", "name": "C", "aliases": ["gcc"], "extension": "c",
                               "compiled": True, "version": "12", "available": True}]}

    async def m_stats(self, p: protocol.StatsParams, rid: Any, send: Any) -> dict[str, Any]:
        rooms = [r for r in self.rooms.values() if p.sandbox_id in (None, r["sandboxId"])]
        return {"backend": "v1", "sandboxes": [
            {"sandboxId": r["sandboxId"], "status": r["status"], "activeRuns": 0,
             "limits": {"memoryBytes": 1 << 29},
             "usage": {"cpuTimeMs": 5, "memoryPeakBytes": None, "memoryCurrentBytes": None,
                       "pidsCurrent": 1, "pidsPeak": None, "oomKills": None}}
            for r in rooms]}

    # background processes: one fake process per id, "ended" once killed

    def _proc(self, pid: str) -> dict[str, Any]:
        procs: dict[str, dict[str, Any]] = self.__dict__.setdefault("procs", {})
        if pid not in procs:
            raise errors.ProcessNotFound(f"no process {pid}", processId=pid)
        return procs[pid]

    async def m_startProcess(self, p: protocol.StartProcessParams, rid: Any,
                             send: Any) -> dict[str, Any]:
        procs: dict[str, dict[str, Any]] = self.__dict__.setdefault("procs", {})
        pid = p.process_id or f"proc-{len(procs) + 1}"
        procs[pid] = {"processId": pid, "pid": 7, "command": p.command, "status": "running",
                      "startedAt": NOW}
        return procs[pid]

    async def m_getProcess(self, p: protocol.ProcessParams, rid: Any,
                           send: Any) -> dict[str, Any]:
        return self._proc(p.process_id)

    async def m_listProcesses(self, p: protocol.ListProcessesParams, rid: Any,
                              send: Any) -> dict[str, Any]:
        return {"processes": list(self.__dict__.get("procs", {}).values())}

    async def m_getProcessLogs(self, p: protocol.ProcessLogsParams, rid: Any,
                               send: Any) -> dict[str, Any]:
        self._proc(p.process_id)
        data = "0123456789"[p.stdout_offset or 0:]
        return {"stdout": data, "stderr": "", "stdoutOffset": 10,
                "stderrOffset": p.stderr_offset or 0, "truncated": False}

    async def m_streamProcessLogs(self, p: protocol.ProcessLogsParams, rid: Any,
                                  send: Any) -> dict[str, Any]:
        rec = self._proc(p.process_id)
        for stream in ("stdout", "stderr"):
            await send(protocol.notification("process.output", protocol.ProcessOutput(
                request_id=rid, process_id=p.process_id, stream=stream, data=stream[:3])))
        if p.process_id == "cut":
            await asyncio.sleep(3600)  # the connection goes quiet mid-stream
        return {**rec, "status": "completed", "endedAt": NOW, "exitCode": 0, "verdict": "OK"}

    async def m_killProcess(self, p: protocol.KillProcessParams, rid: Any,
                            send: Any) -> dict[str, Any]:
        rec = self._proc(p.process_id)
        rec.update(status="killed", endedAt=NOW, exitCode=143, signal="SIGTERM", verdict="SG")
        return rec

    async def m_killAllProcesses(self, p: protocol.KillAllProcessesParams, rid: Any,
                                 send: Any) -> dict[str, Any]:
        procs = self.__dict__.get("procs", {})
        live = [r for r in procs.values() if r["status"] == "running"]
        for r in live:
            r.update(status="killed", endedAt=NOW)
        return {"killed": len(live)}

    async def m_waitForLog(self, p: protocol.WaitForLogParams, rid: Any,
                           send: Any) -> dict[str, Any]:
        self._proc(p.process_id)
        return {"line": f"found {p.pattern}"}
    # ports (docs/ports.md)

    async def m_waitForPort(self, p: protocol.WaitForPortParams, rid: Any,
                            send: Any) -> dict[str, Any]:
        if p.port == 9:
            raise errors.ProcessReadyTimeout("not ready", port=p.port, timeout=p.timeout)
        return {"ready": True, "port": p.port, **({"status": 200} if p.mode == "http" else {})}

    async def m_exposePort(self, p: protocol.ExposePortParams, rid: Any,
                           send: Any) -> dict[str, Any]:
        where = ({"path": f"/run/ports/{p.port}.sock"} if p.unix_socket
                 else {"url": f"http://127.0.0.1:{40000 + p.port}"})
        got = {"port": p.port, "name": p.name or str(p.port), **where}
        self.exposed[p.port] = got
        return got

    async def m_unexposePort(self, p: protocol.UnexposePortParams, rid: Any,
                             send: Any) -> dict[str, Any]:
        return {"port": p.port, "unexposed": self.exposed.pop(p.port, None) is not None}

    async def m_getExposedPorts(self, p: protocol.GetExposedPortsParams, rid: Any,
                                send: Any) -> dict[str, Any]:
        return {"ports": list(self.exposed.values())}

    # persistence (docs/persistence.md)

    def _backup(self, sandbox_id: str, d: str | None) -> dict[str, Any]:
        return {"backupId": "bk-0123456789abcdef", "sandboxId": sandbox_id,
                "dir": d or "/workspace", "name": "", "sizeBytes": 3, "createdAt": NOW,
                "sha256": "ab"}

    async def m_createBackup(self, p: protocol.CreateBackupParams, rid: Any,
                             send: Any) -> dict[str, Any]:
        return self._backup(p.sandbox_id, p.dir)

    async def m_restoreBackup(self, p: protocol.RestoreBackupParams, rid: Any,
                              send: Any) -> dict[str, Any]:
        if p.backup_id != "bk-0123456789abcdef":
            raise errors.BackupNotFound("no such backup", backupId=p.backup_id)
        return {"sandboxId": p.sandbox_id, "dir": p.dir or "/workspace",
                "backupId": p.backup_id}

    async def m_listBackups(self, p: protocol.ListBackupsParams, rid: Any,
                            send: Any) -> dict[str, Any]:
        return {"backups": [self._backup("alpha", None)]}

    async def m_deleteBackup(self, p: protocol.DeleteBackupParams, rid: Any,
                             send: Any) -> dict[str, Any]:
        return {"backupId": p.backup_id, "deleted": True}

    async def m_forkSandbox(self, p: protocol.ForkSandboxParams, rid: Any,
                            send: Any) -> dict[str, Any]:
        return {"sandboxId": p.sandbox_id, "newSandboxId": p.new_sandbox_id}

    async def m_exportSandbox(self, p: protocol.ExportSandboxParams, rid: Any,
                              send: Any) -> dict[str, Any]:
        for i, piece in enumerate((b"gz", b"ip")):
            await send(protocol.notification("export.chunk", protocol.ExportChunk(
                request_id=rid, data=base64.b64encode(piece).decode(), offset=2 * i)))
        return {"sandboxId": p.sandbox_id, "dir": p.dir or "/workspace", "sizeBytes": 4,
                "sha256": "cd", "chunks": 2}

    async def m_importSandbox(self, p: protocol.ImportSandboxParams, rid: Any,
                              send: Any) -> dict[str, Any]:
        got = self.__dict__.setdefault("imported", [])
        got.append((base64.b64decode(p.data), p.append, p.final))
        return {"sandboxId": p.sandbox_id, "dir": p.dir or "/workspace",
                "sizeBytes": sum(len(d) for d, _, _ in got), "imported": p.final}
    def _term(self, tid: str, **kw: Any) -> dict[str, Any]:
        return {"terminalId": tid, "sandboxId": "alpha", "pid": 9, "tty": "/dev/pts/0",
                "command": "sh", "cols": 80, "rows": 24, "status": "running",
                "attached": True, "createdAt": NOW, **kw}

    async def m_openTerminal(self, p: protocol.OpenTerminalParams, rid: Any,
                             send: Any) -> dict[str, Any]:
        return {"terminalId": "term-1", "pid": 9, "tty": "/dev/pts/0"}

    async def m_writeTerminal(self, p: protocol.WriteTerminalParams, rid: Any,
                              send: Any) -> dict[str, Any]:
        return {"written": len(base64.b64decode(p.data))}

    async def m_resizeTerminal(self, p: protocol.ResizeTerminalParams, rid: Any,
                               send: Any) -> dict[str, Any]:
        return self._term(p.terminal_id, cols=p.cols, rows=p.rows)

    async def m_closeTerminal(self, p: protocol.TerminalParams, rid: Any,
                              send: Any) -> dict[str, Any]:
        return self._term(p.terminal_id, status="exited", exitCode=129, signal="SIGHUP")

    async def m_attachTerminal(self, p: protocol.TerminalParams, rid: Any,
                               send: Any) -> dict[str, Any]:
        return self._term(p.terminal_id)

    async def m_listTerminals(self, p: protocol.ListTerminalsParams, rid: Any,
                              send: Any) -> dict[str, Any]:
        return {"terminals": [self._term("term-1")]}

    def _session(self, sid: str) -> dict[str, Any]:
        return {"sessionId": sid, "sandboxId": "alpha", "createdAt": NOW}

    async def m_createSession(self, p: protocol.CreateSessionParams, rid: Any,
                              send: Any) -> dict[str, Any]:
        return self._session(p.session_id or "s-1")

    async def m_deleteSession(self, p: protocol.SessionParams, rid: Any,
                              send: Any) -> dict[str, Any]:
        return self._session(p.session_id)

    async def m_listSessions(self, p: protocol.ListSessionsParams, rid: Any,
                             send: Any) -> dict[str, Any]:
        return {"sessions": [self._session("s-1")]}

    def _ctx(self, cid: str, **kw: Any) -> dict[str, Any]:
        return {"contextId": cid, "sandboxId": "alpha", "language": "python",
                "cwd": "/workspace", "createdAt": NOW, **kw}

    async def m_createCodeContext(self, p: protocol.CreateCodeContextParams, rid: Any,
                                  send: Any) -> dict[str, Any]:
        return self._ctx("ctx-1", language=p.language)

    async def m_runInContext(self, p: protocol.RunInContextParams, rid: Any,
                             send: Any) -> dict[str, Any]:
        bundle = {"text/plain": "42"}
        if p.stream:
            await send(protocol.notification("context.output", protocol.ContextOutput(
                request_id=rid, context_id=p.context_id, stream="stdout", text="hi\n")))
            await send(protocol.notification("context.result", protocol.ContextResult(
                request_id=rid, context_id=p.context_id, result=bundle)))
        return {"results": [bundle], "logs": {"stdout": ["hi\n"], "stderr": []},
                "executionCount": 1,
                **({"error": {"name": "NameError", "value": "y", "traceback": ["tb"]}}
                   if p.code.strip() == "y" else {})}

    async def m_listCodeContexts(self, p: protocol.ListCodeContextsParams, rid: Any,
                                 send: Any) -> dict[str, Any]:
        return {"contexts": [self._ctx("ctx-1")]}

    async def m_deleteCodeContext(self, p: protocol.ContextParams, rid: Any,
                                  send: Any) -> dict[str, Any]:
        return self._ctx(p.context_id, status="stopped")

    async def m_restartCodeContext(self, p: protocol.ContextParams, rid: Any,
                                   send: Any) -> dict[str, Any]:
        return self._ctx(p.context_id)

    async def m_interruptCodeContext(self, p: protocol.ContextParams, rid: Any,
                                     send: Any) -> dict[str, Any]:
        return self._ctx(p.context_id, status="busy")
    async def m_setNetworkPolicy(self, p: protocol.SetNetworkPolicyParams, rid: Any,
                                 send: Any) -> dict[str, Any]:
        return {"sandboxId": p.sandbox_id,
                "network": msgspec.to_builtins(p.network) if p.network else None}

    async def m_getNetworkLog(self, p: protocol.GetNetworkLogParams, rid: Any,
                              send: Any) -> dict[str, Any]:
        return {"entries": [{"time": NOW, "protocol": "tcp", "address": "203.0.113.9",
                             "port": 443, "allowed": False, "reason": "not allowed"}],
                "stats": {"refused": 1}}

    async def m_watch(self, p: protocol.WatchParams, rid: Any, send: Any) -> dict[str, Any]:
        # one event before the answer and two after it: a watch's events outlive its call
        def event(path: str) -> dict[str, Any]:
            return protocol.notification("watch.event", protocol.WatchEvent(
                request_id=rid, watch_id="w-1", event_type="create", path=path))
        await send(event(f"{p.path}/early"))

        async def later() -> None:
            await asyncio.sleep(0.05)
            await send(event(f"{p.path}/a"))
            await send(event(f"{p.path}/b"))
        self.tasks.append(asyncio.ensure_future(later()))
        return {"watchId": "w-1", "path": p.path, "directories": 1}

    async def m_unwatch(self, p: protocol.UnwatchParams, rid: Any,
                        send: Any) -> dict[str, Any]:
        return {"watchId": p.watch_id, "unwatched": True, "events": 3}


NOW = "2026-11-26T20:00:00.000Z"
REPORT: dict[str, Any] = {
    "status": "OK", "signal": None, "timedOut": False, "limitExceeded": None,
    "oomKilled": False, "outputTruncated": False, "cpuTimeMs": 1, "wallTimeMs": 2,
    "memoryPeakBytes": None, "pidsPeak": 1}
COMPILE_FAILED: dict[str, Any] = {
    "status": "RE", "exitCode": 1, "stdout": "", "stderr": "x.c:1: syntax error\n",
    "cpuTimeMs": 3, "wallTimeMs": 4, "memoryPeakBytes": None, "timedOut": False,
    "oomKilled": False}
#: Result fields the fake sends on purpose although no schema has them (tests of leniency).
UNDECLARED = {"futureField"}


def check_result(method: str, result: Any) -> None:
    """``result`` must decode as the method's result struct, and every field in it (nested
    too) must be one the schema declares: the fake cannot answer what the daemon would not."""
    shape = protocol.METHODS[method].result
    decoded = protocol.convert_result(method, result, shape)
    _declared(decoded, result, method)


def _declared(value: Any, wire: Any, where: str) -> None:
    if isinstance(value, protocol.Result):
        names = set(type(value).__struct_encode_fields__)
        extra = set(wire) - names - UNDECLARED
        assert not extra, f"{where}: fields {extra} are not in {type(value).__name__}"
        for field, wname in zip(type(value).__struct_fields__,
                                type(value).__struct_encode_fields__, strict=True):
            if wname in wire:
                _declared(getattr(value, field), wire[wname], f"{where}.{wname}")
    elif isinstance(value, list):
        for i, (v, w) in enumerate(zip(value, wire, strict=True)):
            _declared(v, w, f"{where}[{i}]")


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sbxc-") as d:
        yield d


@pytest.fixture
def daemon(sockdir: str) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(os.path.join(sockdir, "d.sock")).start()
    try:
        yield fake
    finally:
        fake.stop()
    assert not fake.failures


@pytest.fixture
def client(daemon: FakeDaemon) -> Iterator[Client]:
    with Client(daemon.path, timeout=10) as c:
        yield c


def exec_params(daemon: FakeDaemon) -> list[dict[str, Any]]:
    return [r["params"] for r in daemon.requests if isinstance(r, dict) and r["method"] == "exec"]


# --- sync client -------------------------------------------------------------------------------


def test_ping(client: Client) -> None:
    result = client.ping()
    assert result["message"] == "pong"
    assert result["version"] == "0.0-test"


def test_exec_argv_form_sends_args_ms_timeout_and_stdin(client: Client,
                                                        daemon: FakeDaemon) -> None:
    res = client.sandbox("r1").exec("echo", ["a", "b"], cwd="/tmp", env={"K": "V"},
                                   stdin=b"in\n", timeout=1.5)
    assert isinstance(res, ExecResult)
    assert res.stdout == "echo a b\nin\n"
    assert (res.exit_code, res.success, res.timed_out) == (0, True, False)
    sent = exec_params(daemon)[-1]
    assert sent["args"] == ["a", "b"]
    assert sent["timeout"] == 1500
    assert sent["stdin"] == "in\n"
    assert sent["cwd"] == "/tmp"
    assert "stream" not in sent


def test_exec_shell_form_sends_no_args(client: Client, daemon: FakeDaemon) -> None:
    res = client.sandbox("r1").exec("echo hi | wc -c")
    assert res.command == "sh -c echo hi | wc -c"
    assert "args" not in exec_params(daemon)[-1]


def test_exec_result_keeps_unknown_fields(client: Client) -> None:
    res = client.sandbox("r1").exec("true", [])
    assert res.raw["futureField"] == {"x": 1}
    assert res.status is None  # not sent by this daemon


def test_exec_result_tolerates_missing_and_extra_fields() -> None:
    res = ExecResult.from_wire({"exitCode": 3, "status": "RE", "cpuTimeMs": 12, "brandNew": 1})
    assert (res.exit_code, res.status, res.cpu_time_ms, res.stdout) == (3, "RE", 12, "")
    assert res.raw["brandNew"] == 1
    with pytest.raises(AttributeError):
        res.exit_code = 4  # type: ignore[misc]  # frozen


def test_exec_streams_to_on_output(client: Client) -> None:
    seen: list[tuple[str, str]] = []
    res = client.sandbox("r1").exec("x", [], env={"CHUNKS": "4"},
                                   on_output=lambda s, d: seen.append((s, d)))
    assert seen == [("stdout", "r1:0\n"), ("stderr", "r1:1\n"), ("stdout", "r1:2\n"),
                    ("stderr", "r1:3\n")]
    assert res.exit_code == 0


def test_nonzero_exit_is_a_result(client: Client) -> None:
    res = client.sandbox("r1").exec("false", [], env={"EXIT": "3"})
    assert (res.exit_code, res.success) == (3, False)


def test_get_list_destroy(client: Client) -> None:
    info = client.sandbox("beta").get({"limits": {"memoryBytes": 1 << 29}})
    assert isinstance(info, SandboxInfo)
    assert (info.sandbox_id, info.status) == ("beta", "ready")
    assert info.options == {"limits": {"memoryBytes": 1 << 29}}
    assert {s.sandbox_id for s in client.list_sandboxes()} == {"alpha", "beta"}
    assert dict(client.sandbox("beta").destroy()) == {"sandboxId": "beta", "destroyed": True}
    assert {s.sandbox_id for s in client.list_sandboxes()} == {"alpha"}


def test_get_accepts_room_options_struct(client: Client, daemon: FakeDaemon) -> None:
    from sandboxd.config import RoomLimits, RoomOptions

    client.sandbox("gamma").get(RoomOptions(limits=RoomLimits(pids=64)))
    sent = daemon.requests[-1]["params"]
    assert sent["options"]["limits"]["pids"] == 64


def test_application_error_maps_to_class_with_context(client: Client) -> None:
    with pytest.raises(errors.SandboxNotFound) as info:
        client.sandbox("ghost").destroy()
    assert info.value.code == "SANDBOX_NOT_FOUND"
    assert info.value.context == {"sandboxId": "ghost"}
    with pytest.raises(errors.SandboxNotFound):
        client.sandbox("nope").ping()


def test_protocol_errors_map_to_classes(client: Client) -> None:
    with pytest.raises(errors.MethodNotFound):
        client.call("noSuchMethod", {})
    with pytest.raises(errors.InvalidParams):
        client.call("exec", {"sandboxId": "r1"})  # no command
    with pytest.raises(errors.InvalidParams):
        client.call("exec", {"sandboxId": "r1", "command": "x", "bogus": 1})


def test_error_without_id_is_raised(client: Client) -> None:
    with pytest.raises(errors.InvalidRequest):
        client.call("nullid", {})
    assert client.ping()["message"] == "pong"


def test_unparseable_line_from_daemon_raises_parse_error_then_recovers(client: Client) -> None:
    with pytest.raises(errors.ParseError):
        client.call("garbage", {})
    assert client.ping()["message"] == "pong"  # a fresh connection


def test_batch_returns_results_and_errors_in_order(client: Client) -> None:
    out = client.call_batch([("ping", {}), ("noSuchMethod", {}), ("listSandboxes", None)])
    assert out[0]["message"] == "pong"
    assert isinstance(out[1], errors.MethodNotFound)
    assert [s["sandboxId"] for s in out[2]["sandboxes"]] == ["alpha"]
    assert client.call_batch([]) == []


def test_client_timeout_raises_unreachable_and_recovers(daemon: FakeDaemon) -> None:
    with Client(daemon.path, timeout=0.3) as c:
        # (the daemon hangs for an hour: the client's own 0.3 s deadline is what ends the call,
        # and the error names it; no elapsed-time bound, which a loaded machine could break)
        with pytest.raises(errors.DaemonUnreachable, match=r"no answer within 0\.3 s"):
            c.call("hang", {})
        assert c.ping()["message"] == "pong"


def test_exec_timeout_extends_the_client_deadline(daemon: FakeDaemon) -> None:
    with Client(daemon.path, timeout=0.2) as c:
        res = c.sandbox("r1").exec("x", [], env={"DELAY": "0.4"}, timeout=1)
        assert res.exit_code == 0


def test_connection_dropped_by_daemon(client: Client, daemon: FakeDaemon) -> None:
    assert client.ping()
    daemon.drop_connections()
    # Readiness, not a pause: the close has reached the client's socket (EOF is readable).
    sock = client._sock
    assert sock is not None
    assert select.select([sock], [], [], 30)[0], "the daemon never closed the connection"
    # Closed between calls (the daemon's idle timeout does that): nothing was in flight, so the
    # next call reconnects instead of failing.
    assert client.ping()["message"] == "pong"


def test_missing_socket_is_unreachable_and_names_the_path(sockdir: str) -> None:
    path = os.path.join(sockdir, "nothing.sock")
    with pytest.raises(errors.DaemonUnreachable) as info:
        Client(path).ping()
    assert path in str(info.value)
    assert info.value.context["socket"] == path


def test_refused_socket_is_unreachable(sockdir: str) -> None:
    path = os.path.join(sockdir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens: ECONNREFUSED
    with pytest.raises(errors.DaemonUnreachable, match="refused"):
        Client(path).ping()


def test_bad_timeout_and_stdin_are_refused_locally(client: Client) -> None:
    with pytest.raises(errors.ValidationError):
        client.sandbox("r1").exec("x", [], timeout=0)
    with pytest.raises(errors.ValidationError):
        client.sandbox("r1").exec("x", [], stdin=b"\xff")


def test_one_client_shared_by_threads(client: Client) -> None:
    results: dict[int, str] = {}

    def work(i: int) -> None:
        results[i] = client.sandbox(f"t{i}").exec("echo", [str(i)]).stdout

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {i: f"echo {i}\n" for i in range(8)}


def test_callback_failure_does_not_poison_the_next_call(client: Client) -> None:
    def boom(stream: str, data: str) -> None:
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError):
        client.sandbox("r1").exec("x", [], env={"CHUNKS": "3"}, on_output=boom)
    assert client.ping()["message"] == "pong"


def test_reentrant_call_from_a_callback_is_refused(client: Client) -> None:
    def reenter(stream: str, data: str) -> None:
        client.ping()

    with pytest.raises(RuntimeError, match="own callbacks"):
        client.sandbox("r1").exec("x", [], env={"CHUNKS": "2"}, on_output=reenter)
    assert client.ping()["message"] == "pong"


# --- async client ------------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_async_out_of_order_responses_match_by_id(daemon: FakeDaemon) -> None:
    async def main() -> list[ExecResult]:
        async with AsyncClient(daemon.path, timeout=10) as c:
            slow = c.sandbox("slow").exec("echo", ["slow"], env={"DELAY": "0.3"})
            fast = c.sandbox("fast").exec("echo", ["fast"])
            return list(await asyncio.gather(slow, fast))

    slow, fast = run(main())
    assert slow.stdout == "echo slow\n"
    assert fast.stdout == "echo fast\n"
    # The peer really answered the second request first.
    exec_ids = [r["id"] for r in daemon.requests if r["method"] == "exec"]
    assert [i for i in daemon.answered if i in exec_ids] == exec_ids[::-1]


def test_async_interleaved_notifications_reach_the_right_callbacks(daemon: FakeDaemon) -> None:
    seen: dict[str, list[tuple[str, str]]] = {"a": [], "b": [], "c": []}

    async def main() -> None:
        async with AsyncClient(daemon.path) as c:
            async def one(room: str) -> None:
                async def on_output(stream: str, data: str) -> None:  # coroutine callbacks too
                    seen[room].append((stream, data))
                await c.sandbox(room).exec("x", [], env={"CHUNKS": "5"}, on_output=on_output)
            await asyncio.gather(*(one(r) for r in seen))

    run(main())
    for room, chunks in seen.items():
        assert [d for _, d in chunks] == [f"{room}:{i}\n" for i in range(5)]
        assert [s for s, _ in chunks] == ["stdout", "stderr"] * 2 + ["stdout"]


def test_async_errors_and_batch(daemon: FakeDaemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.path) as c:
            with pytest.raises(errors.SandboxNotFound):
                await c.sandbox("ghost").destroy()
            with pytest.raises(errors.MethodNotFound):
                await c.call("noSuchMethod")
            out = await c.call_batch([("ping", {}), ("destroy", {"sandboxId": "ghost"})])
            assert out[0]["message"] == "pong"
            assert isinstance(out[1], errors.SandboxNotFound)
            assert [s.sandbox_id for s in await c.list_sandboxes()] == ["alpha"]
            assert (await c.sandbox("alpha").get()).status == "ready"

    run(main())


async def daemon_got(daemon: FakeDaemon, method: str) -> None:
    """Until the fake daemon has received a ``method`` request (fails after ~30 s of turns)."""
    for _ in range(3000):
        if any(isinstance(r, dict) and r.get("method") == method for r in daemon.requests):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the daemon never got {method}: {daemon.requests}")


def test_async_parse_error_fails_pending_calls_then_reconnects(daemon: FakeDaemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.path) as c:
            # (DELAY: the exec stays unanswered until the garbage has failed it)
            pending = asyncio.ensure_future(c.sandbox("r").exec("x", [], env={"DELAY": "60"}))
            await daemon_got(daemon, "exec")
            with pytest.raises(errors.ParseError):
                await c.call("garbage")
            with pytest.raises(errors.ParseError):
                await pending
            assert (await c.ping())["message"] == "pong"

    run(main())


def test_async_timeout_leaves_the_connection_usable(daemon: FakeDaemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.path, timeout=0.2) as c:
            with pytest.raises(errors.DaemonUnreachable, match="no answer"):
                await c.call("hang")
            assert (await c.ping())["message"] == "pong"

    run(main())


def test_async_callback_failure_fails_only_its_call(daemon: FakeDaemon) -> None:
    def boom(stream: str, data: str) -> None:
        raise RuntimeError("callback failed")

    async def main() -> None:
        async with AsyncClient(daemon.path) as c:
            other = asyncio.ensure_future(c.sandbox("ok").exec("x", [], env={"DELAY": "0.2"}))
            with pytest.raises(RuntimeError, match="callback failed"):
                await c.sandbox("r").exec("x", [], env={"CHUNKS": "3"}, on_output=boom)
            assert (await other).exit_code == 0
            assert (await c.ping())["message"] == "pong"

    run(main())


def test_async_unreachable(sockdir: str) -> None:
    path = os.path.join(sockdir, "none.sock")

    async def main() -> None:
        async with AsyncClient(path) as c:
            with pytest.raises(errors.DaemonUnreachable, match=path):
                await c.ping()

    run(main())


def test_async_dropped_connection_fails_pending_calls(daemon: FakeDaemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.path) as c:
            pending = asyncio.ensure_future(c.call("hang"))
            await daemon_got(daemon, "hang")
            await asyncio.get_running_loop().run_in_executor(None, daemon.drop_connections)
            with pytest.raises(errors.DaemonUnreachable):
                await asyncio.wait_for(pending, 5)
            assert (await c.ping())["message"] == "pong"

    run(main())


def test_importing_the_client_pulls_in_no_daemon_modules() -> None:
    import subprocess
    import sys

    code = ("import sys, sandboxd.client, sandboxd.cli; "
            "bad = [m for m in sys.modules if m.startswith(('sandboxd.jail', 'sandboxd.server', "
            "'sandboxd.rooms', 'sandboxd.hostsetup', 'sandboxd.daemon'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    assert out.stdout.strip() == "[]"



# --- every method, through the typed client ----------------------------------------------------


def test_every_method_round_trips_through_the_schema(client: Client, daemon: FakeDaemon) -> None:
    """Each client method sends params the schema accepts and decodes a result the schema
    declares (the fake checks both): together they cover every method in METHODS."""
    sb = client.sandbox("alpha")
    assert client.ping().capabilities.id_mapping == "single"
    assert sb.ping().sandbox.runs == 0  # type: ignore[union-attr]
    assert sb.get().incarnation == 1
    assert [s.sandbox_id for s in client.list_sandboxes()] == ["alpha"]
    assert sb.exec("true", []).exit_code == 0
    assert sb.write_file("a.txt", "héllo").bytes_written == 6
    assert sb.write_file("a.txt", b"\x00!", append=True).path == "/workspace/a.txt"
    got = sb.read_file("a.txt")
    assert isinstance(got, FileContent) and got.data == "héllo".encode() + b"\x00!"
    assert got.is_binary is True and got["isBinary"] is True
    assert sb.read_file("a.txt", stream=True).data == got.data
    assert sb.read_file("a.txt", encoding="utf-8").text.startswith("héllo")
    assert sb.exists("a.txt") is True
    assert [f.relative_path for f in sb.list_files()] == ["a.txt"]
    assert sb.rename_file("a.txt", "b.txt").new_path == "/workspace/b.txt"
    assert sb.mkdir("d", recursive=True).recursive is True
    assert sb.move_file("b.txt", "d")["newPath"] == "/workspace/d/b.txt"
    assert sb.delete_file("d/b.txt").success
    assert sb.exists("d/b.txt") is False
    assert sb.git_checkout("/srv/r.git", branch="dev").branch == "dev"
    res = sb.run_code("c", "int main(){}", stdin="x", limits={"cpuTimeMs": 100},
                      compile_limits=protocol.RunLimits(wall_time_ms=5000))
    assert (res.status, res.stdout, res["cached"]) == ("OK", "X", True)
    ce = sb.run_code("c", "syntax error")
    assert ce.status == "CE" and ce.compile is not None and ce["compile"]["exitCode"] == 1
    assert "signal" not in ce  # absent from a CE result, as on the wire
    examples = sb.run_example_code()
    assert [(r.language, r.available) for r in examples] == [("c", True), ("go", False)]
    assert examples[1].get("stdout") is None
    assert [lang.id for lang in client.list_languages()] == ["c"]
    assert client.stats("alpha").sandboxes[0].usage.cpu_time_ms == 5
    proc = sb.start_process("python3 -m http.server", process_id="web")
    assert (proc.id, proc.pid, proc.record.status) == ("web", 7, "running")
    assert "exitCode" not in proc.record  # absent while it runs, as on the wire
    assert proc.logs(stdout_offset=4).stdout == "456789"
    assert proc.wait_for_log("Serving") == "found Serving"
    seen: list[tuple[str, str]] = []
    assert proc.stream(lambda s, d: seen.append((s, d))).verdict == "OK"
    assert seen == [("stdout", "std"), ("stderr", "std")]
    assert [r.process_id for r in sb.list_processes()] == ["web"]
    assert sb.process("web").command == "python3 -m http.server"
    assert proc.kill("TERM").status == "killed" and proc.wait().exit_code == 143
    assert sb.kill_all_processes() == 0
    with pytest.raises(errors.ProcessNotFound):
        sb.get_process("nope")
    assert sb.wait_for_port(8000, mode="http", timeout=2).status == 200
    with pytest.raises(errors.ProcessReadyTimeout):
        sb.wait_for_port(9)
    assert sb.expose_port(8000, name="web").url == "http://127.0.0.1:48000"
    assert sb.expose_port(8001, unix_socket=True).path == "/run/ports/8001.sock"
    assert [e.name for e in sb.get_exposed_ports()] == ["web", "8001"]
    assert sb.unexpose_port(8000).unexposed is True
    assert sb.unexpose_port(8000).unexposed is False
    assert sb.create_backup(excludes=["*.log"]).backup_id == "bk-0123456789abcdef"
    assert sb.restore_backup("bk-0123456789abcdef", "/srv").dir == "/srv"
    with pytest.raises(errors.BackupNotFound):
        sb.restore_backup("bk-ffffffffffffffff")
    assert [b.sandbox_id for b in client.list_backups()] == ["alpha"]
    assert client.delete_backup("bk-0123456789abcdef").deleted is True
    assert sb.fork("beta").id == "beta"
    out = io.BytesIO()
    assert sb.export(out).chunks == 2 and out.getvalue() == b"gzip"
    assert sb.import_archive(b"archive").imported is True
    assert daemon.__dict__["imported"] == [(b"archive", False, True)]
    term = sb.open_terminal(cols=100, rows=30)
    assert (term.terminal_id, term.tty) == ("term-1", "/dev/pts/0")
    assert sb.write_terminal("term-1", b"ls\n") == 3
    assert sb.resize_terminal("term-1", 120, 40).cols == 120
    assert sb.attach_terminal("term-1").attached is True
    assert [t.terminal_id for t in sb.list_terminals()] == ["term-1"]
    assert sb.close_terminal("term-1").exit_code == 129
    assert sb.create_session(cwd="/srv", env={"A": "1"}).session_id == "s-1"
    assert [s.session_id for s in sb.list_sessions()] == ["s-1"]
    assert sb.delete_session("s-2").session_id == "s-2"
    cc = sb.create_code_context("javascript", memory_bytes=1 << 28, cpu_time_ms=500)
    assert (cc.context_id, cc.language) == ("ctx-1", "javascript")
    sent_cc = next(r for r in daemon.requests if r["method"] == "createCodeContext")["params"]
    assert sent_cc["limits"] == {"memoryBytes": 1 << 28, "cpuTimeMs": 500}
    streamed: list[Any] = []
    cell = sb.run_in_context("ctx-1", "41 + 1", timeout=2,
                             on_output=lambda s, t: streamed.append((s, t)),
                             on_result=streamed.append)
    assert streamed == [("stdout", "hi\n"), {"text/plain": "42"}]
    assert cell.results == [{"text/plain": "42"}] and cell.logs.stdout == ["hi\n"]
    assert "error" not in cell and cell.execution_count == 1
    assert sb.run_in_context("ctx-1", "y").error.name == "NameError"
    sent_cell = next(r for r in daemon.requests if r["method"] == "runInContext")["params"]
    assert (sent_cell["timeout"], sent_cell["stream"]) == (2000, True)
    assert [c.context_id for c in sb.list_code_contexts()] == ["ctx-1"]
    assert sb.interrupt_code_context("ctx-1").status == "busy"
    assert sb.restart_code_context("ctx-1").context_id == "ctx-1"
    assert sb.delete_code_context("ctx-1").status == "stopped"
    sb.exec("cd /", session_id="s-1")
    assert exec_params(daemon)[-1]["sessionId"] == "s-1"
    assert sb.set_network_policy({"allow": ["a.test:443"]}).network.allow == ["a.test:443"]
    assert sb.set_network_policy(None).network is None
    with pytest.raises(errors.InvalidParams, match="network"):
        sb.set_network_policy({"allow": "x"})
    log = sb.get_network_log(limit=5)
    assert (log.entries[0].port, log.stats.refused) == (443, 1)
    with sb.watch("/w") as w:
        assert w.id == "w-1"
        assert [e.path for e in w.events(1.0)] == ["/w/early", "/w/a", "/w/b"]
        assert w.next(0.05) is None
    assert sb.unwatch("w-1").events == 3
    assert sb.destroy().destroyed is True
    sent = next(r for r in daemon.requests if r["method"] == "runCode")["params"]
    assert sent["limits"] == {"cpuTimeMs": 100} and sent["compileLimits"] == {"wallTimeMs": 5000}
    assert daemon.validated == set(protocol.METHODS)


def test_bad_limits_are_invalid_params_before_sending(client: Client,
                                                      daemon: FakeDaemon) -> None:
    with pytest.raises(errors.InvalidParams, match="limits"):
        client.sandbox("r1").exec("x", [], limits={"cpuTimeMs": 0})
    assert not exec_params(daemon)


def test_async_every_method_round_trips(daemon: FakeDaemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.path) as c:
            sb = c.sandbox("alpha")
            assert (await sb.ping()).sandbox
            await sb.write_file("x", b"12345")
            assert (await sb.read_file("x", stream=True)).data == b"12345"
            assert (await sb.read_file("x")).data == b"12345"
            assert (await sb.wait_for_port(80)).ready is True
            assert (await sb.expose_port(80)).url == "http://127.0.0.1:40080"
            assert [e.port for e in await sb.get_exposed_ports()] == [80]
            assert (await sb.unexpose_port(80)).unexposed is True
            assert (await sb.open_terminal("sh", [])).terminal_id == "term-1"
            assert await sb.write_terminal("term-1", b"x") == 1
            assert (await sb.resize_terminal("term-1", 10, 5)).rows == 5
            assert (await sb.attach_terminal("term-1")).status == "running"
            assert len(await sb.list_terminals()) == 1
            assert (await sb.close_terminal("term-1")).status == "exited"
            assert (await sb.create_session("s-9")).session_id == "s-9"
            assert len(await sb.list_sessions()) == 1
            assert (await sb.delete_session("s-9")).session_id == "s-9"
            assert (await sb.create_code_context()).context_id == "ctx-1"
            got_out: list[Any] = []
            r = await sb.run_in_context("ctx-1", "1", on_output=lambda s, t: got_out.append(t))
            assert r.results[0]["text/plain"] == "42" and got_out == ["hi\n"]
            assert len(await sb.list_code_contexts()) == 1
            assert (await sb.interrupt_code_context("ctx-1")).status == "busy"
            assert (await sb.restart_code_context("ctx-1")).status == "ready"
            assert (await sb.delete_code_context("ctx-1")).status == "stopped"
            assert (await sb.set_network_policy({"allow": ["x.test"]})).network is not None
            assert len((await sb.get_network_log()).entries) == 1
            seen: list[str] = []
            got = asyncio.Event()

            def on_event(ev: protocol.WatchEvent) -> None:
                seen.append(ev.path)
                if len(seen) == 3:
                    got.set()
            assert (await sb.watch("/w", on_event=on_event)).watch_id == "w-1"
            await asyncio.wait_for(got.wait(), 5)
            assert seen == ["/w/early", "/w/a", "/w/b"]
            assert (await sb.unwatch("w-1")).unwatched is True
            assert await sb.exists("x")
            assert [f.name for f in await sb.list_files()] == ["x"]
            await sb.rename_file("x", "y")
            await sb.mkdir("d")
            await sb.move_file("y", "d")
            await sb.delete_file("d/y")
            assert (await sb.git_checkout("/r")).target_dir == "/workspace/repo"
            assert (await sb.run_code("c", "x", stdin="a")).stdout == "A"
            assert len(await sb.run_example_code()) == 2
            assert (await c.list_languages())[0].compiled
            assert (await c.stats()).backend == "v1"
            proc = await sb.start_process("sleep", ["9"])
            assert (proc.id, proc.command) == ("proc-1", "sleep")
            assert (await proc.logs()).stdout_offset == 10
            assert await proc.wait_for_log("x", regex=True, timeout=1) == "found x"
            seen: list[str] = []

            async def collect(stream: str, data: str) -> None:
                seen.append(stream)

            assert (await proc.stream(collect)).status == "completed"
            assert seen == ["stdout", "stderr"]
            assert [r.pid for r in await sb.list_processes()] == [7]
            assert (await (await sb.process("proc-1")).kill(9)).status == "killed"
            assert (await proc.wait()).status == "killed"
            assert await sb.kill_all_processes() == 0
            assert (await sb.create_backup("/srv", name="n")).dir == "/srv"
            assert (await sb.restore_backup("bk-0123456789abcdef")).dir == "/workspace"
            assert len(await c.list_backups("alpha")) == 1
            assert (await c.delete_backup("bk-0123456789abcdef")).deleted
            assert (await sb.fork("gamma")).id == "gamma"
            pieces: list[bytes] = []
            assert (await sb.export(pieces.append)).size_bytes == 4 and pieces == [b"gz", b"ip"]
            assert (await sb.import_archive(b"x")).imported
            assert (await sb.destroy()).destroyed

    run(main())
    assert daemon.validated >= set(protocol.METHODS) - {"exec", "getSandbox", "listSandboxes"}


def test_a_result_that_breaks_the_schema_is_a_protocol_error(client: Client,
                                                             daemon: FakeDaemon) -> None:
    async def bad(p: Any, rid: Any, send: Any) -> dict[str, Any]:
        return {"sandboxId": 7, "destroyed": "yes"}

    daemon.m_destroy = bad  # type: ignore[method-assign]
    with pytest.raises(errors.InternalError, match="broke the schema"):
        client.sandbox("alpha").destroy()
    daemon.failures.clear()  # expected here: the fake refused its own answer
    with pytest.raises(errors.ProtocolError, match="malformed result of destroy"):
        from sandboxd.client import _result

        _result("destroy", {"sandboxId": 7}, protocol.DestroyResult)
    with pytest.raises(TypeError):
        _result("destroy", {}, protocol.ExecResult)


def test_import_archive_sends_a_file_in_pieces(client: Client, daemon: FakeDaemon,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A binary file is read as it goes: first piece append false, last final true."""
    import sandboxd.client as clientmod

    monkeypatch.setattr(clientmod, "IMPORT_CHUNK", 4)
    got = client.sandbox("alpha").import_archive(io.BytesIO(b"0123456789"), "/srv")
    assert (got.imported, got.size_bytes, got.dir) == (True, 10, "/srv")
    assert daemon.__dict__["imported"] == [(b"0123", False, False), (b"4567", True, False),
                                           (b"89", True, True)]
