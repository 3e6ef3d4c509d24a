/** Shared by the tests: the daemon's socket (from tests/integration/test_ts_client.py) and rooms. */
import { SandboxdClient, type CallOptions } from "../src/index.js";

export function socketPath(): string {
  const path = process.env.SANDBOXD_TEST_SOCKET;
  if (!path) throw new Error("SANDBOXD_TEST_SOCKET is not set (run through tests/integration/test_ts_client.py)");
  return path;
}

let counter = 0;
/** A room id unique to this run. */
export function roomId(what: string): string {
  return `ts-${process.pid}-${++counter}-${what}`.slice(0, 63);
}

/** A client that records which methods it called (to prove every method was covered). */
export class RecordingClient extends SandboxdClient {
  readonly called = new Set<string>();

  override callRaw(method: string, params: unknown, options: CallOptions = {}): Promise<unknown> {
    this.called.add(method);
    return super.callRaw(method, params, options);
  }
}

/** Wait until `check` is true (polling), or fail after `ms`. */
export async function until(check: () => boolean, ms = 20000, what = "condition"): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
