/** Bad input is refused by the daemon, and the client passes its error on unchanged: the field
 * named, the stable code, nothing run. The client does not second-guess the schema. */
import assert from "node:assert/strict";
import { after, describe, it } from "node:test";
import * as E from "../src/errors.js";
import { SandboxdClient, getSandbox } from "../src/index.js";
import { roomId, socketPath } from "./helpers.js";

const client = new SandboxdClient(socketPath(), { timeoutMs: 120000 });
const sb = getSandbox(client, roomId("bad"));
after(async () => {
  await sb.destroy().catch(() => undefined);
  client.close();
});

async function refused(p: Promise<unknown>, field: RegExp): Promise<E.SandboxError> {
  const err = await p.then(() => assert.fail("accepted"), (e: unknown) => e);
  assert.ok(err instanceof E.SandboxError, String(err));
  assert.ok(err.code === "INVALID_PARAMS" || err.code === "VALIDATION_FAILED", err.code);
  assert.match(err.message, field);
  return err;
}

describe("bad input", () => {
  it("a misspelt option is refused naming it", async () => {
    const err = await refused(client.callRaw("exec", { sandboxId: sb.id, command: "true",
                                                       timeuot: 5 }), /timeuot/);
    assert.ok(err instanceof E.InvalidParams);
  });

  it("wrong types and out-of-range values are refused naming the field", async () => {
    await refused(client.callRaw("exec", { sandboxId: sb.id, command: 7 }), /command/);
    await refused(sb.exec("true", [], { timeout: -5 }), /timeout/);
    await refused(sb.writeFile("x", "y", { encoding: "latin1" as never }), /encoding/);
    await refused(sb.startProcess("true", [], { processId: "bad id!" }), /processId/);
    await refused(sb.openTerminal({ cols: 0 }), /cols/);
    await refused(client.callRaw("writeFile", { sandboxId: sb.id, path: "p" }), /content/);
  });

  it("a NUL byte in a path is refused", async () => {
    const err = await sb.readFile("a\u0000b").then(() => assert.fail("accepted"), (e: unknown) => e);
    assert.ok(err instanceof E.SandboxError);
    assert.ok(["VALIDATION_FAILED", "INVALID_PARAMS"].includes(err.code), err.code);
  });

  it("nothing ran and the connection is still good", async () => {
    assert.equal((await sb.exists("x")).exists, false);
    assert.equal(client.generation, 1);
  });
});
