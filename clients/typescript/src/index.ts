/**
 * @sandboxd/client: sandboxd from TypeScript, with the Cloudflare Sandbox SDK's surface.
 *
 *   import { getSandbox } from "@sandboxd/client";
 *   const sandbox = getSandbox("/run/user/1000/sandboxd/sandboxd.sock", "room-1");
 *   const r = await sandbox.exec("node", ["script.js"]);
 */
export { SandboxdClient, defaultSocket } from "./client.js";
export type { AnyNotification, CallOptions, ClientOptions, NotificationHandler } from "./client.js";
export { ExecutionSession, Sandbox, Terminal, Watch, clientFor, closeAll, getSandbox }
  from "./sandbox.js";
export type { Encoding, ExecOptions, ExportedArchive, OpenTerminalOptions, OutputCallback,
  ReadFileOptions, SandboxOptions, Target, TerminalHandlers } from "./sandbox.js";
export { CodeRunService } from "./coderun.js";
export type { CodeRunContext, RunCodeRequest } from "./coderun.js";
export * from "./errors.js";
export type * from "./protocol.js";
export { METHODS, PARAMS } from "./protocol.js";
