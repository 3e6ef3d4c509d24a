/** Every wire method through the typed surface, against a real daemon; the last test checks that
 * the recorded calls name every method of the generated table (src/protocol.ts METHODS). */
import assert from "node:assert/strict";
import { after, describe, it } from "node:test";
import { METHODS, Sandbox, getSandbox, type MethodName } from "../src/index.js";
import { RecordingClient, roomId, socketPath, until } from "./helpers.js";

const client = new RecordingClient(socketPath(), { timeoutMs: 120000 });
const rooms: Sandbox[] = [];
function room(what: string, options?: Record<string, unknown>): Sandbox {
  const sb = getSandbox(client, roomId(what), { options });
  rooms.push(sb);
  return sb;
}

after(async () => {
  for (const sb of rooms) await sb.destroy().catch(() => undefined);
  client.close();
});

describe("rooms", () => {
  it("ping, getSandbox, listSandboxes, stats, destroy", async () => {
    const sb = room("rooms");
    const pong = await client.call("ping", {});
    assert.equal(typeof pong.version, "string");
    assert.ok(Array.isArray(pong.capabilities.namespaces));
    const info = await sb.get({});
    assert.equal(info.sandboxId, sb.id);
    assert.equal(info.status, "ready");
    const roomPing = await sb.ping();
    assert.equal(roomPing.sandbox?.sandboxId, sb.id);
    assert.equal(roomPing.sandbox?.init, true);
    const listed = await client.call("listSandboxes", {});
    assert.ok(listed.sandboxes.some((s) => s.sandboxId === sb.id));
    const stats = await sb.stats();
    assert.ok(stats.sandboxes.some((s) => s.sandboxId === sb.id));
    const gone = await sb.destroy();
    assert.deepEqual([gone.sandboxId, gone.destroyed], [sb.id, true]);
  });
});

describe("exec", () => {
  it("argv and shell forms, exit codes as results, env, stdin, cwd", async () => {
    const sb = room("exec");
    const r = await sb.exec("echo", ["hello", "world"]);
    assert.equal(r.stdout, "hello world\n");
    assert.equal(r.exitCode, 0);
    assert.equal(r.success, true);
    assert.equal(r.status, "OK");
    const bad = await sb.exec("echo oops >&2; exit 3");
    assert.deepEqual([bad.exitCode, bad.success, bad.stderr, bad.status], [3, false, "oops\n", "RE"]);
    const env = await sb.exec("printf %s \"$GREETING\"", undefined, { env: { GREETING: "hi" } });
    assert.equal(env.stdout, "hi");
    const cat = await sb.exec("cat", [], { stdin: "in put" });
    assert.equal(cat.stdout, "in put");
    await sb.mkdir("/workspace/d");
    assert.equal((await sb.exec("pwd", [], { cwd: "/workspace/d" })).stdout, "/workspace/d\n");
    const slow = await sb.exec("sleep", ["5"], { timeout: 300 });
    assert.equal(slow.timedOut, true);
    assert.equal(slow.status, "TO");
    // as the Cloudflare SDK (and the seed's check) has it
    assert.deepEqual([slow.exitCode, slow.success], [-1, false]);
    assert.match(slow.stderr, /^Execution timed out after 300ms\. /);
    client.execTimeoutMs = 300; // the SDK's automatic timeout protection: a default timeout
    try {
      const loop = await sb.exec("while :; do :; done");
      assert.deepEqual([loop.timedOut, loop.exitCode], [true, -1]);
      assert.ok(loop.stderr.includes("timed out"));
      assert.equal((await sb.exec("echo", ["quick"])).exitCode, 0);
    } finally {
      client.execTimeoutMs = undefined;
    }
  });
});

describe("files", () => {
  it("write, read, exists, mkdir, list, rename, move, delete", async () => {
    const sb = room("files");
    const w = await sb.writeFile("script.js", 'console.log("Hello World!");', { encoding: "utf8" });
    assert.equal(w.success, true);
    assert.equal(w.bytesWritten, 28);
    const r = await sb.readFile("script.js");
    assert.equal(r.content, 'console.log("Hello World!");');
    const b64 = await sb.readFile("script.js", { encoding: "base64" });
    assert.equal(Buffer.from(b64.content, "base64").toString(), 'console.log("Hello World!");');
    await sb.writeFile("bin.dat", Buffer.from([0, 255, 1]).toString("base64"), { encoding: "base64" });
    const bin = await sb.readFile("bin.dat");
    assert.equal(bin.isBinary, true);
    assert.deepEqual([...Buffer.from(bin.content, "base64")], [0, 255, 1]);
    await sb.writeFile("script.js", "\n// more", { append: true });
    assert.match((await sb.readFile("script.js")).content, /more$/);
    assert.equal((await sb.exists("script.js")).exists, true);
    assert.equal((await sb.exists("script.js")).type, "file");
    assert.equal((await sb.exists("nope")).exists, false);
    const mk = await sb.mkdir("a/b/c", { recursive: true });
    assert.equal(mk.recursive, true);
    const listed = await sb.listFiles("/workspace", { recursive: true });
    assert.ok(listed.files.some((f) => f.relativePath === "a/b/c" && f.type === "directory"));
    const ren = await sb.renameFile("script.js", "renamed.js");
    assert.equal(ren.newPath, "/workspace/renamed.js");
    const mv = await sb.moveFile("renamed.js", "a/b");
    assert.equal(mv.newPath, "/workspace/a/b/renamed.js");
    const del = await sb.deleteFile("a/b/renamed.js", {});
    assert.equal(del.success, true);
    assert.equal((await sb.exists("a/b/renamed.js")).exists, false);
  });

  it("gitCheckout clones a repository that lives in the room", async () => {
    const sb = room("git");
    const made = await sb.exec("set -e; export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@t "
      + "GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@t; mkdir -p /srv/o.git; cd /srv/o.git; "
      + "git init -q -b trunk .; echo one > a.txt; git add a.txt; git commit -qm one; "
      + "git checkout -qb feature; echo f > f.txt; git add f.txt; git commit -qm f");
    assert.equal(made.exitCode, 0, made.stderr);
    const r = await sb.gitCheckout("/srv/o.git", { branch: "feature", targetDir: "src" });
    assert.deepEqual([r.success, r.branch, r.targetDir], [true, "feature", "/workspace/src"]);
    assert.equal((await sb.readFile("src/f.txt")).content, "f\n");
  });
});

describe("code", () => {
  it("listLanguages, runCode, runExampleCode", async () => {
    const sb = room("code");
    const langs = await client.call("listLanguages", {});
    assert.ok(langs.languages.length >= 13);
    const py = langs.languages.find((l) => l.id === "python");
    assert.ok(py);
    const examples = await sb.runExampleCode();
    assert.equal(examples.length, langs.languages.length);
    if (py.available) {
      const r = await sb.runCode("python", "print(input().upper())", { stdin: "abc\n" });
      assert.deepEqual([r.stdout, r.exitCode, r.status, r.success], ["ABC\n", 0, "OK", true]);
    }
  });
});

describe("processes", () => {
  it("start, get, list, logs, waitForLog, kill, killAll", async () => {
    const sb = room("procs");
    const p = await sb.startProcess("sh", ["-c", "echo ready; echo err >&2; sleep 60"],
                                    { processId: "web" });
    assert.deepEqual([p.processId, p.status], ["web", "running"]);
    const line = await sb.waitForLog("web", "ready", { timeout: 20000 });
    assert.equal(line.line, "ready");
    const logs = await sb.getProcessLogs("web");
    assert.equal(logs.stdout, "ready\n");
    const more = await sb.getProcessLogs("web", { stdoutOffset: logs.stdoutOffset });
    assert.equal(more.stdout, "");
    assert.equal((await sb.getProcess("web")).status, "running");
    assert.ok((await sb.listProcesses()).some((x) => x.processId === "web"));
    const killed = await sb.killProcess("web", "SIGTERM");
    assert.equal(killed.processId, "web");
    await sb.startProcess("sleep", ["60"], { processId: "s1" });
    await sb.startProcess("sleep", ["60"], { processId: "s2" });
    assert.equal(await sb.killAllProcesses(), 2);
    await sb.startProcess("sh", ["-c", "echo a; echo b >&2"], { processId: "short" });
    const seen: string[] = [];
    const end = await sb.streamProcessLogs("short", (s, d) => seen.push(`${s}:${d}`));
    assert.deepEqual(seen.sort(), ["stderr:b\n", "stdout:a\n"]);
    assert.equal(end.status, "completed");
  });
});

describe("ports", () => {
  it("waitForPort, exposePort (fetched from here), getExposedPorts, unexposePort", async () => {
    const sb = room("ports");
    await sb.startProcess("sh", ["-c", "cd /workspace && echo hi > index.html && "
      + "exec timeout 120 python3 -m http.server 8000 --bind 127.0.0.1"], { processId: "http" });
    const ready = await sb.waitForPort(8000, { processId: "http", mode: "http", timeout: 30000 });
    assert.equal(ready.ready, true);
    const exposed = await sb.exposePort(8000, { name: "web" });
    assert.match(exposed.url ?? "", /^http:\/\/127\.0\.0\.1:\d+$/);
    const res = await fetch(`${exposed.url}/index.html`);
    assert.equal(await res.text(), "hi\n");
    assert.deepEqual((await sb.getExposedPorts()).map((x) => x.name), ["web"]);
    assert.equal((await sb.unexposePort(8000)).unexposed, true);
    assert.deepEqual(await sb.getExposedPorts(), []);
  });
});

describe("persistence", () => {
  it("createBackup, listBackups, restoreBackup, deleteBackup", async () => {
    const sb = room("backup");
    await sb.writeFile("keep.txt", "v1");
    const b = await sb.createBackup({ name: "first" });
    assert.equal(b.sandboxId, sb.id);
    assert.ok((await sb.listBackups()).some((x) => x.backupId === b.backupId));
    await sb.writeFile("keep.txt", "v2");
    const restored = await sb.restoreBackup(b.backupId);
    assert.equal(restored.backupId, b.backupId);
    assert.equal((await sb.readFile("keep.txt")).content, "v1");
    assert.equal((await sb.deleteBackup(b.backupId)).deleted, true);
    assert.equal((await client.call("deleteBackup", { backupId: b.backupId })).deleted, false);
  });

  it("forkSandbox, exportSandbox, importSandbox", async () => {
    const sb = room("fork-src");
    await sb.writeFile("f.txt", "forked");
    const forkId = roomId("fork-dst");
    const fork = await sb.fork(forkId);
    rooms.push(fork);
    assert.equal((await fork.readFile("f.txt")).content, "forked");
    const archive = await sb.exportSandbox();
    assert.equal(archive.data.length, archive.sizeBytes);
    assert.equal(archive.data[0], 0x1f); // gzip
    const dst = room("import");
    const imported = await dst.importSandbox(archive.data, { chunkBytes: 64 });
    assert.equal(imported.imported, true);
    assert.equal((await dst.readFile("f.txt")).content, "forked");
  });
});

describe("terminals", () => {
  it("open, write, resize, attach, list, close", async () => {
    const sb = room("term");
    let out = "";
    const exits: number[] = [];
    const term = await sb.openTerminal({
      command: "sh", args: ["-c", "stty -echo; while read l; do echo \"got $l\"; done"],
      cols: 100, rows: 30,
      onOutput: (d) => { out += d.toString(); }, onExit: (e) => exits.push(e.exitCode) });
    assert.match(term.id, /^term-/);
    await term.write("one\n");
    await until(() => out.includes("got one"), 20000, "terminal output");
    const resized = await term.resize(120, 40);
    assert.deepEqual([resized.cols, resized.rows], [120, 40]);
    const listed = await sb.listTerminals();
    assert.ok(listed.some((t) => t.terminalId === term.id && t.status === "running"));
    let again = "";
    const attached = await sb.attachTerminal(term.id, { onOutput: (d) => { again += d.toString(); } });
    await attached.write("two\n");
    await until(() => again.includes("got two"), 20000, "attached output");
    const closed = await attached.close();
    assert.equal(closed.terminalId, term.id);
  });
});

describe("sessions", () => {
  it("createSession keeps cwd and variables; exec, startProcess in it; list, delete", async () => {
    const sb = room("sessions");
    const session = await sb.createSession({ id: "main", env: { GREETING: "hi" } });
    assert.equal(session.id, "main");
    await session.exec("cd /tmp && X=42 && f() { echo fn; }");
    const r = await session.exec('pwd; echo "$X $GREETING"; f');
    assert.equal(r.stdout, "/tmp\n42 hi\nfn\n");
    assert.equal((await sb.exec("pwd")).stdout, "/workspace\n"); // not in the session
    const p = await session.startProcess("pwd", [], { processId: "in-session" });
    assert.equal(p.processId, "in-session");
    const listed = await sb.listSessions();
    assert.deepEqual(listed.map((x) => x.sessionId), ["main"]);
    const gone = await session.delete();
    assert.equal(gone.sessionId, "main");
    assert.deepEqual(await sb.listSessions(), []);
  });
});

describe("file watch", () => {
  it("watch sees a create and a delete; unwatch ends it", async () => {
    const sb = room("watch");
    await sb.mkdir("/workspace/w");
    const events: Array<[string, string]> = [];
    const w = await sb.watch("/workspace/w", { onEvent: (e) => events.push([e.eventType, e.path]) });
    assert.deepEqual([w.info.path, w.info.directories], ["/workspace/w", 1]);
    // writeFile writes a temporary file and renames it: f.txt appears by a move_to
    await sb.writeFile("/workspace/w/f.txt", "x");
    await until(() => events.some(([t, p]) => t === "move_to" && p === "/workspace/w/f.txt"),
                20000, `f.txt's event (got ${JSON.stringify(events)})`);
    await sb.exec("echo y > /workspace/w/g.txt");
    await until(() => events.some(([t, p]) => t === "create" && p === "/workspace/w/g.txt"),
                20000, `g.txt's create (got ${JSON.stringify(events)})`);
    await sb.deleteFile("/workspace/w/f.txt");
    await until(() => events.some(([t]) => t === "delete"), 20000, "a delete event");
    const end = await w.unwatch();
    assert.equal(end.unwatched, true);
    assert.ok(end.events >= 2);
  });
});

describe("network", () => {
  it("setNetworkPolicy allows a name, getNetworkLog shows the refused ones; null cuts off", async () => {
    const sb = room("network");
    const set = await sb.setNetworkPolicy({ allow: ["allowed.test:9"], hosts: { "allowed.test": "127.0.0.1" } });
    assert.deepEqual(set.network?.allow, ["allowed.test:9"]);
    const r = await sb.exec("python3", ["-c", "import socket\ntry: socket.getaddrinfo('nope.test', 80)\nexcept OSError: print('no')"]);
    assert.equal(r.stdout, "no\n");
    const log = await sb.getNetworkLog(10);
    assert.ok(log.entries.some((e) => e.protocol === "dns" && e.name === "nope.test" && !e.allowed));
    assert.ok(log.stats.refused >= 1);
    assert.equal((await sb.setNetworkPolicy(null)).network, null);
  });
});

describe("code contexts", () => {
  it("a javascript context keeps its state; results, logs, errors; restart, interrupt, delete", async () => {
    const sb = room("contexts");
    const ctx = await sb.createCodeContext({ language: "javascript" });
    assert.deepEqual([ctx.language, ctx.cwd, ctx.status], ["javascript", "/workspace", "ready"]);
    await sb.runInContext(ctx.contextId, "let n = 41");
    const seen: string[] = [];
    const r = await sb.runInContext(ctx.contextId, "console.log('hi'); n + 1",
                                    { onOutput: (_s, t) => seen.push(t) });
    assert.deepEqual(r.results, [{ "text/plain": "42" }]);
    assert.deepEqual([r.logs.stdout, seen], [["hi\n"], ["hi\n"]]);
    const bad = await sb.runInContext(ctx.contextId, "throw new TypeError('nope')");
    assert.deepEqual([bad.error?.name, bad.error?.value], ["TypeError", "nope"]);
    const slow = await sb.runInContext(ctx.contextId, "while (true) {}", { timeoutMs: 300 });
    assert.equal(slow.error?.name, "KeyboardInterrupt");
    assert.equal((await sb.interruptCodeContext(ctx.contextId)).contextId, ctx.contextId);
    assert.deepEqual((await sb.listCodeContexts()).map((c) => c.contextId), [ctx.contextId]);
    await sb.restartCodeContext(ctx.contextId);
    const fresh = await sb.runInContext(ctx.contextId, "typeof n");
    assert.deepEqual(fresh.results, [{ "text/plain": "'undefined'" }]);
    assert.equal((await sb.deleteCodeContext(ctx.contextId)).contextId, ctx.contextId);
    assert.deepEqual(await sb.listCodeContexts(), []);
  });
});

describe("coverage", () => {
  it("every method of the schema was called", () => {
    const all = Object.keys(METHODS) as MethodName[];
    const missing = all.filter((m) => !client.called.has(m));
    assert.deepEqual(missing, [], `methods never called: ${missing.join(", ")}`);
  });
});
