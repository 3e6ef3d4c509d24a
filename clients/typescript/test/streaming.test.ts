/** Notifications: exec, runCode and process output, chunked reads and exports, routed to the call
 * that asked for them while other calls share the connection. */
import assert from "node:assert/strict";
import { after, describe, it } from "node:test";
import { SandboxdClient, getSandbox, type AnyNotification } from "../src/index.js";
import { roomId, socketPath } from "./helpers.js";

const stray: AnyNotification[] = [];
const client = new SandboxdClient(socketPath(), { timeoutMs: 120000,
                                                  onNotification: (n) => stray.push(n) });
const sb = getSandbox(client, roomId("stream"));
after(async () => {
  await sb.destroy().catch(() => undefined);
  client.close();
});

describe("streaming", () => {
  it("exec with onOutput gets the output in order before the result", async () => {
    const chunks: Array<[string, string]> = [];
    const r = await sb.exec("for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.05; done",
                            undefined, { onOutput: (s, d) => chunks.push([s, d]) });
    const text = (s: string) => chunks.filter(([k]) => k === s).map(([, d]) => d).join("");
    assert.equal(text("stdout"), "out1\nout2\nout3\n");
    assert.equal(text("stderr"), "err1\nerr2\nerr3\n");
    assert.equal(r.exitCode, 0);
  });

  it("exec with stream:true and no callback still answers", async () => {
    const r = await sb.exec("echo", ["x"], { stream: true });
    assert.equal(r.exitCode, 0);
  });

  it("two streamed calls at once each get only their own output", async () => {
    const a: string[] = [];
    const b: string[] = [];
    await Promise.all([
      sb.exec("for i in 1 2 3 4 5; do echo A$i; sleep 0.02; done", undefined,
              { onOutput: (_s, d) => a.push(d) }),
      sb.exec("for i in 1 2 3 4 5; do echo B$i; sleep 0.02; done", undefined,
              { onOutput: (_s, d) => b.push(d) }),
    ]);
    assert.equal(a.join(""), "A1\nA2\nA3\nA4\nA5\n");
    assert.equal(b.join(""), "B1\nB2\nB3\nB4\nB5\n");
  });

  it("readFile with stream puts the chunks back together", async () => {
    const big = "0123456789abcdef".repeat(40000); // 640 KB: several chunks
    await sb.writeFile("big.txt", big);
    const seen: number[] = [];
    const r = await sb.readFile("big.txt", { stream: true, onChunk: (c) => seen.push(c.offset) });
    assert.ok(seen.length > 1, `only ${seen.length} chunk(s)`);
    assert.equal(r.stream, true);
    assert.equal(r.content.length, big.length);
    assert.equal(r.content, big);
  });

  it("streamProcessLogs replays and follows until the process ends", async () => {
    await sb.startProcess("sh", ["-c", "echo first; sleep 0.3; echo second"], { processId: "tail" });
    const got: string[] = [];
    const end = await sb.streamProcessLogs("tail", (_s, d) => got.push(d));
    assert.equal(got.join(""), "first\nsecond\n");
    assert.equal(end.status, "completed");
    assert.equal(end.exitCode, 0);
  });

  it("exportSandbox streams export.chunk notifications", async () => {
    await sb.writeFile("x.txt", "x");
    const arch = await sb.exportSandbox();
    assert.ok(arch.chunks >= 1);
    assert.equal(arch.data.length, arch.sizeBytes);
  });

  it("an onOutput that throws fails its own call only", async () => {
    const boom = new Error("callback broke");
    const other = sb.exec("sleep 0.3; echo fine");
    await assert.rejects(sb.exec("echo x; sleep 0.2", undefined,
                                 { onOutput: () => { throw boom; } }), (e) => e === boom);
    assert.equal((await other).stdout, "fine\n");
    assert.equal((await sb.exec("echo", ["after"])).stdout, "after\n");
  });

  it("no notification went astray", () => {
    assert.deepEqual(stray, []);
  });
});
