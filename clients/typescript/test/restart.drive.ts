/**
 * Driven by tests/integration/test_ts_client.py (not a node:test file): make a call that is in
 * flight, say IN-FLIGHT, and expect it to fail when the driver kills the daemon; wait for
 * RESTARTED on stdin, then the next call on the same client must reconnect and work.
 * Exit 0 and print OK, or exit 1 with the reason on stderr.
 */
import { createInterface } from "node:readline";
import { DaemonUnreachable, getSandbox, SandboxdClient } from "../src/index.js";

const client = new SandboxdClient(process.env.SANDBOXD_TEST_SOCKET ?? "", { timeoutMs: 60000 });
const sb = getSandbox(client, "restart-room");
const lines = createInterface({ input: process.stdin });
const next = (): Promise<string> => new Promise((r) => lines.once("line", r));

function fail(why: string): never {
  process.stderr.write(`restart.drive: ${why}\n`);
  process.exit(1);
}

async function main(): Promise<void> {
  await sb.exec("true");
  if (client.generation !== 1) fail(`generation ${client.generation} before the restart`);
  const hold = process.env.SANDBOXD_TEST_HOLD_S ?? "30";
  const inflight = sb.exec("sleep", [hold]).then(
    (r) => ({ ok: true as const, r }), (err: unknown) => ({ ok: false as const, err }));
  await new Promise((r) => setTimeout(r, 300)); // the request is on the wire
  const restarted = next();
  process.stdout.write("IN-FLIGHT\n");
  const out = await inflight;
  if (out.ok) fail("the in-flight call did not fail: " + JSON.stringify(out.r));
  const err = out.err;
  if (!(err instanceof DaemonUnreachable)) fail(`in-flight call failed with ${String(err)}`);
  if (err.code !== "DAEMON_UNREACHABLE") fail(`code ${err.code}`);
  if (!/connection lost/.test(err.message) || !/next call reconnects/.test(err.message)
      || !/may or may not have run/.test(err.message)) fail(`unclear message: ${err.message}`);
  await restarted;
  const r = await sb.exec("echo", ["again"]);
  if (r.stdout !== "again\n") fail(`after the restart: ${JSON.stringify(r)}`);
  if ((client.generation as number) !== 2) fail(`generation ${client.generation} after the reconnect`);
  // A second call on the new connection works as well.
  const pong = await sb.ping();
  if (pong.sandbox?.sandboxId !== "restart-room") fail(`ping: ${JSON.stringify(pong)}`);
  process.stdout.write("OK\n");
  client.close();
  lines.close();
}

main().catch((err: unknown) => fail(String(err instanceof Error ? err.stack : err)));
