/** Many calls in flight on one connection: answers matched by id whatever order they come in. */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { after, describe, it } from "node:test";
import { SandboxdClient, getSandbox } from "../src/index.js";
import { roomId, socketPath } from "./helpers.js";

const client = new SandboxdClient(socketPath(), { timeoutMs: 120000 });
const rooms = [getSandbox(client, roomId("conc-a")), getSandbox(client, roomId("conc-b"))];
after(async () => {
  for (const sb of rooms) await sb.destroy().catch(() => undefined);
  client.close();
});

describe("concurrency on one connection", () => {
  it("24 execs across two rooms, answered out of order, each with its own result", async () => {
    await Promise.all(rooms.map((sb) => sb.exec("true")));
    const gen = client.generation;
    let answered = 0;
    const calls = Array.from({ length: 24 }, (_, i) => {
      const sb = rooms[i % 2]!;
      // later calls sleep less: their answers overtake the earlier ones
      const delay = ((24 - i) * 0.02).toFixed(2);
      return sb.exec(`sleep ${delay}; echo ${i}`).then((r) => ({ i, r, at: answered++ }));
    });
    const done = await Promise.all(calls);
    for (const { i, r } of done) {
      assert.equal(r.stdout, `${i}\n`);
      assert.equal(r.exitCode, 0);
    }
    const order = [...done].sort((a, b) => a.at - b.at).map((d) => d.i);
    assert.notDeepEqual(order, done.map((d) => d.i), "answers all came in request order");
    assert.equal(client.generation, gen, "the calls did not share one connection");
  });

  it("errors and results interleave without crossing", async () => {
    const sb = rooms[0]!;
    const out = await Promise.allSettled([
      sb.readFile("/workspace/missing-1"),
      sb.exec("echo", ["ok"]),
      sb.readFile("/workspace/missing-2"),
      sb.exists("/workspace"),
    ]);
    assert.equal(out[0]!.status, "rejected");
    assert.equal(out[1]!.status === "fulfilled" && out[1]!.value.stdout, "ok\n");
    assert.equal(out[2]!.status, "rejected");
    assert.equal(out[3]!.status === "fulfilled" && out[3]!.value.exists, true);
    const r0 = out[0] as PromiseRejectedResult;
    assert.match(String(r0.reason.message), /missing-1/);
    assert.match(String((out[2] as PromiseRejectedResult).reason.message), /missing-2/);
  });

  it("an idle connection does not keep a script alive; one with a call in flight does", () => {
    const index = new URL("../src/index.js", import.meta.url).href;
    const script = `import { getSandbox } from ${JSON.stringify(index)};
      const sb = getSandbox(${JSON.stringify(socketPath())}, ${JSON.stringify(rooms[0]!.id)});
      const r = await sb.exec("sleep 0.5; echo done");
      console.log(r.stdout.trim());`;  // no close(): the process must still end
    // spawnSync's timeout kills a script that hangs on its idle connection (status null)
    const out = spawnSync(process.execPath, ["--input-type=module", "-e", script],
                          { encoding: "utf8", timeout: 30000 });
    assert.equal(out.status, 0, out.stderr);
    assert.equal(out.stdout, "done\n");
  });
});
