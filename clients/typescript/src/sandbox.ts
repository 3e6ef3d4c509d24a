/**
 * `getSandbox(target, id)` and the `Sandbox` it returns: the Cloudflare Sandbox SDK's surface
 * (0.x, the seed's signatures) on sandboxd's methods, one wire call each.
 *
 * Results are the daemon's wire objects (src/protocol.ts): the seed's field names (`stdout`,
 * `stderr`, `exitCode`, `success`, ...) and sandboxd's verdict fields (`status`, `timedOut`,
 * `cpuTimeMs`, ...). Errors are the classes of src/errors.ts, each carrying its stable `code`.
 * A room is made by the first call that names it; `getSandbox(.., {options})` makes (or
 * re-gets) it with those options before the first call.
 */
import { SandboxdClient, type CallOptions, type NotificationHandler } from "./client.js";
import type * as P from "./protocol.js";

export type Encoding = "utf-8" | "utf8" | "base64";
export type OutputCallback = (stream: "stdout" | "stderr", data: string) => void;

export interface SandboxOptions {
  /** getSandbox options (limits, network, sleepAfter, ...), sent once before the first call */
  options?: Record<string, unknown>;
  /** client options when `target` is a socket path */
  timeoutMs?: number;
}

export interface ExecOptions {
  /** stream output to `onOutput` as it is produced (implied by `onOutput`) */
  stream?: boolean;
  onOutput?: OutputCallback;
  cwd?: string;
  /** a null value unsets the variable */
  env?: Record<string, string | null>;
  stdin?: string;
  /** ms */
  timeout?: number;
  limits?: P.RunLimits;
  user?: "root" | "sandbox";
  /** run in this session (createSession): its cwd, variables and functions carry over */
  sessionId?: string;
}

export interface FileOptions { stream?: boolean }

export interface ReadFileOptions {
  encoding?: Encoding;
  /** read in chunks (`file.chunk`); `onChunk` gets each, `content` is their concatenation */
  stream?: boolean;
  onChunk?: (chunk: P.FileChunk) => void;
}

export interface TerminalHandlers {
  /** bytes the program wrote */
  onOutput?: (data: Buffer) => void;
  onExit?: (exit: P.TerminalExit) => void;
}

export type OpenTerminalOptions = Omit<P.OpenTerminalParams, "sandboxId"> & TerminalHandlers;

/** A terminal opened (or attached) on this connection. */
export class Terminal {
  constructor(readonly sandbox: Sandbox, readonly id: string,
              readonly info: P.OpenTerminalResult | P.TerminalInfo, private requestId: number) {}

  write(data: string | Uint8Array): Promise<P.WriteTerminalResult> {
    return this.sandbox.writeTerminal(this.id, data);
  }

  resize(cols: number, rows: number): Promise<P.TerminalInfo> {
    return this.sandbox.resizeTerminal(this.id, cols, rows);
  }

  async close(): Promise<P.TerminalInfo> {
    try {
      return await this.sandbox.closeTerminal(this.id);
    } finally {
      this.sandbox.client.release(this.requestId);
    }
  }
}

/** A persistent shell of the room (createSession): the Cloudflare SDK's ExecutionSession. */
export class ExecutionSession {
  constructor(readonly sandbox: Sandbox, readonly id: string, readonly info: P.SessionInfo) {}

  exec(command: string, args?: string[], options: ExecOptions = {}): Promise<P.ExecResult> {
    return this.sandbox.exec(command, args, { ...options, sessionId: this.id });
  }

  startProcess(command: string, args?: string[],
               options: Omit<P.StartProcessParams, "sandboxId" | "command" | "args"> = {}
  ): Promise<P.ProcessInfo> {
    return this.sandbox.startProcess(command, args, { ...options, sessionId: this.id });
  }

  openTerminal(options: OpenTerminalOptions = {}): Promise<Terminal> {
    return this.sandbox.openTerminal({ ...options, sessionId: this.id });
  }

  delete(): Promise<P.SessionInfo> {
    return this.sandbox.deleteSession(this.id);
  }
}

/** A watch made on this connection: its events go to `onEvent` until `unwatch()`. */
export class Watch {
  constructor(readonly sandbox: Sandbox, readonly id: string, readonly info: P.WatchResult,
              private requestId: number) {}

  async unwatch(): Promise<P.UnwatchResult> {
    try {
      return await this.sandbox.unwatch(this.id);
    } finally {
      this.sandbox.client.release(this.requestId);
    }
  }
}

function terminalRouter(h: TerminalHandlers): NotificationHandler {
  return (n) => {
    if (n.method === "terminal.output") h.onOutput?.(Buffer.from(n.params.data, "base64"));
    else if (n.method === "terminal.exit") h.onExit?.(n.params);
  };
}

function outputRouter(onOutput: OutputCallback): NotificationHandler {
  return (n) => {
    if (n.method === "exec.output" || n.method === "process.output") {
      onOutput(n.params.stream, n.params.data);
    }
  };
}

/** The result of exportSandbox: the daemon's answer and the archive it streamed. */
export interface ExportedArchive extends P.ExportSandboxResult {
  data: Buffer;
}

export class Sandbox {
  readonly client: SandboxdClient;
  readonly id: string;
  private options: Record<string, unknown> | undefined;
  private made: Promise<P.SandboxInfo> | null = null;
  private madeIn = -1;

  constructor(client: SandboxdClient, id: string, options?: Record<string, unknown>) {
    this.client = client;
    this.id = id;
    this.options = options;
  }

  private async call<M extends P.MethodName>(method: M, params: P.Methods[M]["params"],
                                             opts: CallOptions = {}): Promise<P.Methods[M]["result"]> {
    if (this.options !== undefined && (this.made === null || this.madeIn !== this.client.generation)) {
      await this.get(this.options);
    }
    return await this.client.call(method, params, opts);
  }

  /** getSandbox: make the room (with `options`) or describe it. */
  async get(options?: Record<string, unknown>): Promise<P.SandboxInfo> {
    const params: P.GetSandboxParams = { sandboxId: this.id };
    if (options !== undefined) params.options = options;
    this.made = this.client.call("getSandbox", params);
    const info = await this.made.catch((err: unknown) => { this.made = null; throw err; });
    this.madeIn = this.client.generation;
    return info;
  }

  ping(): Promise<P.PingResult> {
    return this.call("ping", { sandboxId: this.id });
  }

  destroy(): Promise<P.DestroyResult> {
    this.made = null;
    return this.client.call("destroy", { sandboxId: this.id });
  }

  stats(): Promise<P.StatsResult> {
    return this.call("stats", { sandboxId: this.id });
  }

  // --- exec and code ---------------------------------------------------------------------------

  /**
   * `command` with `args` (argv), or without args a shell line. A non-zero exit is a result.
   * A run that timed out is reported as the Cloudflare SDK reports it (the seed checks
   * `exitCode === -1 && stderr.includes('timed out')`): `exitCode` -1 and "Execution timed out
   * after N ms..." added to `stderr`, beside sandboxd's verdict (`status` TO, `timedOut`).
   */
  async exec(command: string, args?: string[], options: ExecOptions = {}): Promise<P.ExecResult> {
    const { onOutput, stream, ...rest } = options;
    const params: P.ExecParams = { sandboxId: this.id, command, ...rest };
    if (args !== undefined) params.args = args;
    const timeout = rest.timeout ?? this.client.execTimeoutMs;
    if (timeout !== undefined) params.timeout = timeout;
    const streamed = stream === true || onOutput !== undefined;
    if (streamed) params.stream = true;
    const timeoutMs = this.client.timeoutMs !== undefined && timeout !== undefined
      ? this.client.timeoutMs + timeout : undefined;
    // Streamed without a callback: the output is in the result; the chunks go nowhere.
    const onNotification = onOutput !== undefined ? outputRouter(onOutput)
      : streamed ? () => undefined : undefined;
    const r = await this.call("exec", params, { onNotification, timeoutMs });
    if (!r.timedOut) return r;
    const ms = timeout ?? r.wallTimeMs ?? r.duration;
    const note = `Execution timed out after ${ms}ms. This may be due to an infinite loop or `
      + "long-running code.";
    const sep = r.stderr === "" || r.stderr.endsWith("\n") ? "" : "\n";
    return { ...r, exitCode: -1, success: false, stderr: `${r.stderr}${sep}${note}` };
  }

  runCode(language: string, code: string,
          options: Omit<P.RunCodeParams, "sandboxId" | "language" | "code"> & {
            onOutput?: OutputCallback } = {}): Promise<P.RunCodeResult> {
    const { onOutput, ...rest } = options;
    const params: P.RunCodeParams = { sandboxId: this.id, language, code, ...rest };
    if (onOutput !== undefined) params.stream = true;
    return this.call("runCode", params, {
      onNotification: onOutput !== undefined ? outputRouter(onOutput) : undefined });
  }

  async runExampleCode(): Promise<P.ExampleResult[]> {
    return (await this.call("runExampleCode", { sandboxId: this.id })).results;
  }

  // --- files -----------------------------------------------------------------------------------

  writeFile(path: string, content: string,
            options: { encoding?: Encoding; append?: boolean; stream?: boolean } = {}
  ): Promise<P.WriteFileResult> {
    const params: P.WriteFileParams = { sandboxId: this.id, path, content };
    if (options.encoding !== undefined) params.encoding = options.encoding;
    if (options.append) params.append = true;
    return this.call("writeFile", params);
  }

  async readFile(path: string, options: ReadFileOptions = {}): Promise<P.ReadFileResult> {
    const params: P.ReadFileParams = { sandboxId: this.id, path };
    if (options.encoding !== undefined) params.encoding = options.encoding;
    if (!options.stream) return await this.call("readFile", params);
    params.stream = true;
    const pieces: P.FileChunk[] = [];
    const result = await this.call("readFile", params, {
      onNotification: (n) => {
        if (n.method !== "file.chunk") return;
        pieces.push(n.params);
        options.onChunk?.(n.params);
      },
    });
    pieces.sort((a, b) => a.offset - b.offset);
    // Chunks are base64 whatever the file holds: the text is the bytes, if they are UTF-8.
    const bytes = Buffer.concat(pieces.map((c) => Buffer.from(c.data, c.encoding === "base64"
      ? "base64" : "utf8")));
    let text: string | undefined;
    if (options.encoding !== "base64") {
      try {
        text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
      } catch {
        text = undefined;
      }
    }
    return text !== undefined
      ? { ...result, content: text, encoding: "utf-8", isBinary: false }
      : { ...result, content: bytes.toString("base64"), encoding: "base64",
          isBinary: options.encoding !== "base64" };
  }

  deleteFile(path: string, _options: FileOptions = {}): Promise<P.DeleteFileResult> {
    return this.call("deleteFile", { sandboxId: this.id, path });
  }

  renameFile(oldPath: string, newPath: string, _options: FileOptions = {}): Promise<P.RenameResult> {
    return this.call("renameFile", { sandboxId: this.id, oldPath, newPath });
  }

  moveFile(sourcePath: string, destinationPath: string,
           _options: FileOptions = {}): Promise<P.RenameResult> {
    return this.call("moveFile", { sandboxId: this.id, sourcePath, destinationPath });
  }

  mkdir(path: string, options: { recursive?: boolean; stream?: boolean } = {}): Promise<P.MkdirResult> {
    const params: P.MkdirParams = { sandboxId: this.id, path };
    if (options.recursive) params.recursive = true;
    return this.call("mkdir", params);
  }

  listFiles(path?: string, options: { recursive?: boolean; includeHidden?: boolean } = {}
  ): Promise<P.ListFilesResult> {
    const params: P.ListFilesParams = { sandboxId: this.id, ...options };
    if (path !== undefined) params.path = path;
    return this.call("listFiles", params);
  }

  exists(path: string): Promise<P.ExistsResult> {
    return this.call("exists", { sandboxId: this.id, path });
  }

  gitCheckout(repoUrl: string,
              options: { branch?: string; targetDir?: string; depth?: number; timeout?: number;
                         stream?: boolean } = {}): Promise<P.GitCheckoutResult> {
    const { stream: _stream, ...rest } = options;
    return this.call("gitCheckout", { sandboxId: this.id, repoUrl, ...rest });
  }

  // --- background processes --------------------------------------------------------------------

  startProcess(command: string, args?: string[],
               options: Omit<P.StartProcessParams, "sandboxId" | "command" | "args"> = {}
  ): Promise<P.ProcessInfo> {
    const params: P.StartProcessParams = { sandboxId: this.id, command, ...options };
    if (args !== undefined) params.args = args;
    return this.call("startProcess", params);
  }

  getProcess(processId: string): Promise<P.ProcessInfo> {
    return this.call("getProcess", { sandboxId: this.id, processId });
  }

  async listProcesses(): Promise<P.ProcessInfo[]> {
    return (await this.call("listProcesses", { sandboxId: this.id })).processes;
  }

  getProcessLogs(processId: string,
                 offsets: { stdoutOffset?: number; stderrOffset?: number } = {}): Promise<P.ProcessLogs> {
    return this.call("getProcessLogs", { sandboxId: this.id, processId, ...offsets });
  }

  /** Replay, then follow, a process's output until it ends; the answer is its final record. */
  streamProcessLogs(processId: string, onOutput: OutputCallback,
                    offsets: { stdoutOffset?: number; stderrOffset?: number } = {}
  ): Promise<P.ProcessInfo> {
    return this.call("streamProcessLogs", { sandboxId: this.id, processId, ...offsets },
                     { onNotification: outputRouter(onOutput) });
  }

  killProcess(processId: string, signal?: number | string): Promise<P.ProcessInfo> {
    const params: P.KillProcessParams = { sandboxId: this.id, processId };
    if (signal !== undefined) params.signal = signal;
    return this.call("killProcess", params);
  }

  async killAllProcesses(): Promise<number> {
    return (await this.call("killAllProcesses", { sandboxId: this.id })).killed;
  }

  waitForLog(processId: string, pattern: string,
             options: { regex?: boolean; timeout?: number } = {}): Promise<P.WaitForLogResult> {
    return this.call("waitForLog", { sandboxId: this.id, processId, pattern, ...options });
  }

  // --- ports -----------------------------------------------------------------------------------

  waitForPort(port: number, options: Omit<P.WaitForPortParams, "sandboxId" | "port"> = {}
  ): Promise<P.WaitForPortResult> {
    return this.call("waitForPort", { sandboxId: this.id, port, ...options });
  }

  exposePort(port: number, options: { name?: string; unixSocket?: boolean } = {}
  ): Promise<P.ExposedPort> {
    return this.call("exposePort", { sandboxId: this.id, port, ...options });
  }

  unexposePort(port: number): Promise<P.UnexposePortResult> {
    return this.call("unexposePort", { sandboxId: this.id, port });
  }

  async getExposedPorts(): Promise<P.ExposedPort[]> {
    return (await this.call("getExposedPorts", { sandboxId: this.id })).ports;
  }

  // --- persistence -----------------------------------------------------------------------------

  createBackup(options: Omit<P.CreateBackupParams, "sandboxId"> = {}): Promise<P.BackupInfo> {
    return this.call("createBackup", { sandboxId: this.id, ...options });
  }

  restoreBackup(backupId: string, dir?: string): Promise<P.RestoreBackupResult> {
    const params: P.RestoreBackupParams = { sandboxId: this.id, backupId };
    if (dir !== undefined) params.dir = dir;
    return this.call("restoreBackup", params);
  }

  async listBackups(): Promise<P.BackupInfo[]> {
    return (await this.call("listBackups", { sandboxId: this.id })).backups;
  }

  deleteBackup(backupId: string): Promise<P.DeleteBackupResult> {
    return this.client.call("deleteBackup", { backupId });
  }

  /** A new room with a copy of this one's writable layer. */
  async fork(newSandboxId: string): Promise<Sandbox> {
    await this.call("forkSandbox", { sandboxId: this.id, newSandboxId });
    return new Sandbox(this.client, newSandboxId);
  }

  /** A directory as a gzip'd tar, streamed in `export.chunk`s and put together here. */
  async exportSandbox(options: Omit<P.ExportSandboxParams, "sandboxId"> = {}): Promise<ExportedArchive> {
    const pieces: P.ExportChunk[] = [];
    const result = await this.call("exportSandbox", { sandboxId: this.id, ...options }, {
      onNotification: (n) => { if (n.method === "export.chunk") pieces.push(n.params); },
    });
    pieces.sort((a, b) => a.offset - b.offset);
    return { ...result, data: Buffer.concat(pieces.map((c) => Buffer.from(c.data, "base64"))) };
  }

  /** Unpack a gzip'd tar into `dir`, sent in pieces of `chunkBytes`. */
  async importSandbox(data: Uint8Array, options: { dir?: string; chunkBytes?: number } = {}
  ): Promise<P.ImportSandboxResult> {
    const step = options.chunkBytes ?? 1 << 20;
    let last: P.ImportSandboxResult | undefined;
    for (let off = 0; off === 0 || off < data.length; off += step) {
      const piece = data.subarray(off, off + step);
      const params: P.ImportSandboxParams = {
        sandboxId: this.id, data: Buffer.from(piece).toString("base64"),
        append: off > 0, final: off + step >= data.length };
      if (options.dir !== undefined) params.dir = options.dir;
      last = await this.call("importSandbox", params);
    }
    return last as P.ImportSandboxResult;
  }

  // --- terminals -------------------------------------------------------------------------------

  /** A pty running a shell (or `command`); its output and exit go to the handlers. */
  async openTerminal(options: OpenTerminalOptions = {}): Promise<Terminal> {
    const { onOutput, onExit, ...rest } = options;
    let rid = -1;
    const info = await this.call("openTerminal", { sandboxId: this.id, ...rest }, {
      keep: true, onNotification: terminalRouter({ onOutput, onExit }),
      onId: (id) => { rid = id; } });
    return new Terminal(this, info.terminalId, info, rid);
  }

  /** Take over a terminal's output (its last 256 KiB first) on this connection. */
  async attachTerminal(terminalId: string, handlers: TerminalHandlers = {}): Promise<Terminal> {
    let rid = -1;
    const info = await this.client.call("attachTerminal", { terminalId }, {
      keep: true, onNotification: terminalRouter(handlers), onId: (id) => { rid = id; } });
    return new Terminal(this, terminalId, info, rid);
  }

  writeTerminal(terminalId: string, data: string | Uint8Array): Promise<P.WriteTerminalResult> {
    const bytes = typeof data === "string" ? Buffer.from(data, "utf8") : Buffer.from(data);
    return this.client.call("writeTerminal", { terminalId, data: bytes.toString("base64") });
  }

  resizeTerminal(terminalId: string, cols: number, rows: number): Promise<P.TerminalInfo> {
    return this.client.call("resizeTerminal", { terminalId, cols, rows });
  }

  closeTerminal(terminalId: string): Promise<P.TerminalInfo> {
    return this.client.call("closeTerminal", { terminalId });
  }

  async listTerminals(): Promise<P.TerminalInfo[]> {
    return (await this.call("listTerminals", { sandboxId: this.id })).terminals;
  }

  // --- sessions --------------------------------------------------------------------------------

  /** A persistent shell: `exec` in it keeps cwd, variables, functions and aliases. */
  async createSession(options: { id?: string; cwd?: string; env?: Record<string, string | null> } = {}
  ): Promise<ExecutionSession> {
    const params: P.CreateSessionParams = { sandboxId: this.id };
    if (options.id !== undefined) params.sessionId = options.id;
    if (options.cwd !== undefined) params.cwd = options.cwd;
    if (options.env !== undefined) params.env = options.env;
    const info = await this.call("createSession", params);
    return new ExecutionSession(this, info.sessionId, info);
  }

  deleteSession(sessionId: string): Promise<P.SessionInfo> {
    return this.call("deleteSession", { sandboxId: this.id, sessionId });
  }

  async listSessions(): Promise<P.SessionInfo[]> {
    return (await this.call("listSessions", { sandboxId: this.id })).sessions;
  }

  // --- code interpreter contexts (docs/contexts.md) -------------------------------------------

  /** A persistent python / javascript / typescript kernel whose state lasts across cells. */
  createCodeContext(options: Omit<P.CreateCodeContextParams, "sandboxId"> = {}
  ): Promise<P.CodeContextInfo> {
    return this.call("createCodeContext", { sandboxId: this.id, ...options });
  }

  /** One cell against the context's state; `onOutput` / `onResult` stream it as it runs. */
  runInContext(contextId: string, code: string, options: {
    timeoutMs?: number;
    onOutput?: (stream: string, text: string) => void;
    onResult?: (result: Record<string, unknown>) => void } = {}
  ): Promise<P.RunInContextResult> {
    const { onOutput, onResult } = options;
    const stream = onOutput !== undefined || onResult !== undefined;
    const params: P.RunInContextParams = { sandboxId: this.id, contextId, code };
    if (options.timeoutMs !== undefined) params.timeout = options.timeoutMs;
    if (stream) params.stream = true;
    return this.call("runInContext", params, {
      onNotification: stream ? (n) => {
        if (n.method === "context.output") onOutput?.(n.params.stream, n.params.text);
        else if (n.method === "context.result") onResult?.(n.params.result);
      } : undefined });
  }

  async listCodeContexts(): Promise<P.CodeContextInfo[]> {
    return (await this.call("listCodeContexts", { sandboxId: this.id })).contexts;
  }

  deleteCodeContext(contextId: string): Promise<P.CodeContextInfo> {
    return this.call("deleteCodeContext", { sandboxId: this.id, contextId });
  }

  restartCodeContext(contextId: string): Promise<P.CodeContextInfo> {
    return this.call("restartCodeContext", { sandboxId: this.id, contextId });
  }

  interruptCodeContext(contextId: string): Promise<P.CodeContextInfo> {
    return this.call("interruptCodeContext", { sandboxId: this.id, contextId });
  }

  // --- network egress (docs/network.md) ---------------------------------------------------------

  /** Change the room's egress policy; `null` cuts it off and closes its connections. */
  setNetworkPolicy(network: P.NetworkOptions | null): Promise<P.NetworkPolicyResult> {
    return this.call("setNetworkPolicy", { sandboxId: this.id, network });
  }

  /** The room's recent connections, allowed and refused, and its counters. */
  getNetworkLog(limit?: number): Promise<P.NetworkLogResult> {
    const params: P.GetNetworkLogParams = { sandboxId: this.id };
    if (limit !== undefined) params.limit = limit;
    return this.call("getNetworkLog", params);
  }

  // --- file watch ------------------------------------------------------------------------------

  /** Watch `path` in the room; each change (`watch.event`) goes to `onEvent` until unwatch. */
  async watch(path: string, options: Omit<P.WatchParams, "sandboxId" | "path"> & {
    onEvent: (event: P.WatchEvent) => void } ): Promise<Watch> {
    const { onEvent, ...rest } = options;
    let rid = -1;
    const info = await this.call("watch", { sandboxId: this.id, path, ...rest }, {
      keep: true, onId: (id) => { rid = id; },
      onNotification: (n) => { if (n.method === "watch.event") onEvent(n.params); } });
    return new Watch(this, info.watchId, info, rid);
  }

  unwatch(watchId: string): Promise<P.UnwatchResult> {
    return this.call("unwatch", { sandboxId: this.id, watchId });
  }
}

/** A target: a socket path, or a client (one connection shared by many sandboxes). */
export type Target = string | SandboxdClient;

const shared = new Map<string, SandboxdClient>();

/** The client for a target: a path gets one shared client per path (one connection). */
export function clientFor(target: Target, options: { timeoutMs?: number } = {}): SandboxdClient {
  if (target instanceof SandboxdClient) return target;
  let c = shared.get(target);
  if (c === undefined) {
    c = new SandboxdClient(target, options);
    shared.set(target, c);
  }
  return c;
}

/** Close the connections getSandbox opened for socket paths (so a script can exit). */
export function closeAll(): void {
  for (const c of shared.values()) c.close();
  shared.clear();
}

/** The seed's entry point: `getSandbox(env.SANDBOX, roomId)` with a socket path (or a client). */
export function getSandbox(target: Target, sandboxId: string, options: SandboxOptions = {}): Sandbox {
  return new Sandbox(clientFor(target, { timeoutMs: options.timeoutMs }), sandboxId,
                     options.options);
}
