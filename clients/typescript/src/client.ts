/**
 * The connection: newline-delimited JSON-RPC 2.0 over sandboxd's Unix socket (README, "Wire
 * contract"), many concurrent calls on one socket.
 *
 * One `net.Socket` per client, opened lazily by the first call. Requests carry increasing integer
 * ids; answers are matched by id, in any order. Notifications name their call in
 * `params.requestId` and go to that call's `onNotification`; a call made with `keep` (terminals)
 * keeps receiving them after its answer, until `release(id)`.
 *
 * When the daemon goes away (a restart, a crash), every call in flight fails with a
 * `DaemonUnreachable` saying the connection was lost and that the call may or may not have run;
 * the next call opens a new connection (`generation` counts them).
 */
import { existsSync, realpathSync, statSync } from "node:fs";
import { dirname } from "node:path";
import * as net from "node:net";
import { DaemonUnreachable, ParseError, ProtocolError, SandboxError, fromWire, type WireError }
  from "./errors.js";
import type { MethodName, Methods, Notifications } from "./protocol.js";

/** A notification as received: its method name and params. */
export type AnyNotification = {
  [K in keyof Notifications]: { method: K; params: Notifications[K] }
}[keyof Notifications];

export type NotificationHandler = (n: AnyNotification) => void;

export interface ClientOptions {
  /** ms to wait for a connection and for each answer (a call's own timeout is added); none: forever */
  timeoutMs?: number;
  /** notifications that name no call of ours */
  onNotification?: NotificationHandler;
  /** ms: the `timeout` of a `Sandbox.exec` that gives none (the Cloudflare SDK's automatic
   *  timeout protection); unset: only the daemon's limits apply */
  execTimeoutMs?: number;
}

export interface CallOptions {
  onNotification?: NotificationHandler;
  /** ms to wait for this call's answer (default: the client's) */
  timeoutMs?: number;
  /** keep routing this call's notifications after its answer (until `release(id)`) */
  keep?: boolean;
  /** called with the request id once it is sent */
  onId?: (id: number) => void;
}

interface Pending {
  method: string;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
  onNotification?: NotificationHandler;
  keep: boolean;
  timer?: NodeJS.Timeout;
}

/** The default socket, as the Python client finds it (config.default_client_socket). */
export function defaultSocket(): string {
  const env = process.env.SANDBOXD_SOCKET;
  if (env) return env;
  const system = "/run/sandboxd/sandboxd.sock";
  const uid = typeof process.getuid === "function" ? process.getuid() : 0;
  if (uid === 0) return system;
  const runtime = process.env.XDG_RUNTIME_DIR || `/tmp/sandboxd-${uid}`;
  const path = `${runtime}/sandboxd/sandboxd.sock`;
  return !existsSync(path) && existsSync(system) ? system : path;
}

/** Why directory `path` could be another user's, or null when a socket in it can be trusted
 *  (config.untrusted_dir): every component owned by root or us and writable by no one else
 *  unless sticky; the directory itself ours and private. */
export function untrustedDir(path: string, uid: number): string | null {
  let real: string;
  try {
    real = realpathSync(path);
  } catch {
    return null; // not made yet: whoever makes it decides
  }
  const parts = real.split("/");
  for (let i = 1; i <= parts.length; i++) {
    const comp = parts.slice(0, i).join("/") || "/";
    let st;
    try {
      st = statSync(comp);
    } catch (err) {
      return `${comp}: ${(err as Error).message}`;
    }
    const last = comp === real;
    if ((st.uid !== 0 && st.uid !== uid) || (last && st.uid !== uid)) {
      return `${comp} is owned by uid ${st.uid}`;
    }
    if (st.mode & 0o022 && (last || !(st.mode & 0o1000))) {
      return `${comp} is writable by other users (mode ${(st.mode & 0o7777).toString(8)})`;
    }
  }
  return null;
}

/** Before connecting (H9, as the Python client): a socket under the /tmp fallback directory is
 *  used only if that directory and everything above it can be nobody else's. */
export function checkSocketPath(path: string): void {
  const uid = typeof process.geteuid === "function" ? process.geteuid() : 0;
  const fallback = `/tmp/sandboxd-${uid}`;
  let real = path;
  try {
    real = realpathSync(path);
  } catch {
    /* not there: connect will say so */
  }
  if (!path.startsWith(fallback + "/") && !real.startsWith(fallback + "/")) return;
  const reason = untrustedDir(dirname(path), uid);
  if (reason !== null) {
    throw unreachable(path, `refusing the socket: ${reason} (another user may have made it; `
      + "set XDG_RUNTIME_DIR or SANDBOXD_SOCKET)");
  }
}

function unreachable(path: string, what: string, cause?: unknown): DaemonUnreachable {
  const detail = cause instanceof Error && cause.message ? `: ${cause.message}` : "";
  return new DaemonUnreachable(`sandboxd at ${path}: ${what}${detail}`, { socket: path },
                               { cause });
}

function connectError(path: string, err: NodeJS.ErrnoException): DaemonUnreachable {
  const what = err.code === "ENOENT" ? "no such socket (is sandboxd running? see `sandboxctl doctor`)"
    : err.code === "ECONNREFUSED" ? "connection refused (stale socket: sandboxd is not running)"
    : err.code === "EACCES" ? "permission denied (the socket belongs to another user)"
    : "cannot connect";
  return unreachable(path, what, err);
}

export class SandboxdClient {
  readonly socketPath: string;
  timeoutMs: number | undefined;
  onNotification: NotificationHandler | undefined;
  execTimeoutMs: number | undefined;
  /** how many connections this client has opened (a new one after the daemon went away) */
  generation = 0;
  private sock: net.Socket | null = null;
  private connecting: Promise<net.Socket> | null = null;
  private nextId = 1;
  private pending = new Map<number, Pending>();
  private kept = new Map<number, NotificationHandler>();
  private buffer = "";
  private closed = false;

  constructor(socketPath: string = defaultSocket(), options: ClientOptions = {}) {
    this.socketPath = socketPath;
    this.timeoutMs = options.timeoutMs;
    this.onNotification = options.onNotification;
    this.execTimeoutMs = options.execTimeoutMs;
  }

  /** Connect now (calls connect lazily anyway). */
  async connect(): Promise<void> {
    await this.socket();
  }

  /** Close the connection; calls in flight fail. A later call reconnects. */
  close(): void {
    const sock = this.sock;
    this.sock = null;
    if (sock !== null) {
      this.closed = true;
      sock.destroy();
    }
    this.failAll(unreachable(this.socketPath, "client closed"));
    this.kept.clear();
  }

  /** Stop routing the notifications of a `keep` call. */
  release(id: number): void {
    this.kept.delete(id);
    this.refresh();
  }

  /** An idle connection does not keep the process alive (a script ends when its work does);
   *  one with calls in flight or terminals being followed does. */
  private refresh(): void {
    if (this.sock === null) return;
    if (this.pending.size > 0 || this.kept.size > 0) this.sock.ref();
    else this.sock.unref();
  }

  /** A typed call: `params` and the result are the method's wire structs (src/protocol.ts). */
  call<M extends MethodName>(method: M, params: Methods[M]["params"],
                             options: CallOptions = {}): Promise<Methods[M]["result"]> {
    return this.callRaw(method, params, options) as Promise<Methods[M]["result"]>;
  }

  /** Any method with any params, unchecked (what a raw JSON-RPC peer would send). */
  async callRaw(method: string, params: unknown, options: CallOptions = {}): Promise<unknown> {
    const sock = await this.socket();
    const id = this.nextId++;
    const line = JSON.stringify({ jsonrpc: "2.0", id, method, params: params ?? {} }) + "\n";
    try {
      return await this.send(sock, id, method, line, options);
    } finally {
      this.refresh();
    }
  }

  private send(sock: net.Socket, id: number, method: string, line: string,
               options: CallOptions): Promise<unknown> {
    return new Promise<unknown>((resolve, reject) => {
      const p: Pending = { method, resolve, reject, onNotification: options.onNotification,
                           keep: options.keep ?? false };
      const timeout = options.timeoutMs ?? this.timeoutMs;
      if (timeout !== undefined) {
        p.timer = setTimeout(() => {
          this.pending.delete(id);
          reject(unreachable(this.socketPath, `no answer to ${method} within ${timeout} ms`));
        }, timeout);
      }
      this.pending.set(id, p);
      this.refresh();
      options.onId?.(id);
      sock.write(line, (err) => {
        if (err && this.pending.delete(id)) {
          clearTimeout(p.timer);
          reject(unreachable(this.socketPath, `send of ${method} failed`, err));
        }
      });
    });
  }

  private socket(): Promise<net.Socket> {
    if (this.sock !== null && !this.sock.destroyed) return Promise.resolve(this.sock);
    this.sock = null;
    if (this.connecting !== null) return this.connecting;
    this.closed = false;
    try {
      checkSocketPath(this.socketPath);
    } catch (err) {
      return Promise.reject(err);
    }
    this.connecting = new Promise<net.Socket>((resolve, reject) => {
      const sock = net.connect({ path: this.socketPath });
      let timer: NodeJS.Timeout | undefined;
      const fail = (err: Error): void => {
        clearTimeout(timer);
        this.connecting = null;
        sock.destroy();
        reject(connectError(this.socketPath, err as NodeJS.ErrnoException));
      };
      if (this.timeoutMs !== undefined) {
        timer = setTimeout(() => fail(Object.assign(new Error("connect timed out"),
                                                    { code: "ETIMEDOUT" })), this.timeoutMs);
      }
      sock.once("error", fail);
      sock.once("connect", () => {
        clearTimeout(timer);
        sock.off("error", fail);
        this.connecting = null;
        this.sock = sock;
        this.buffer = "";
        this.generation++;
        sock.setEncoding("utf8");
        sock.on("data", (chunk: string) => this.onData(sock, chunk));
        sock.on("error", () => { /* 'close' follows and reports it */ });
        sock.on("close", () => this.onClose(sock));
        resolve(sock);
      });
    });
    return this.connecting;
  }

  private onClose(sock: net.Socket): void {
    if (this.sock !== sock) return; // an old connection (or close(), or a garbage line)
    this.sock = null;
    if (this.closed) return;
    const n = this.pending.size;
    this.failAll(unreachable(this.socketPath, "connection lost (the daemon closed it, restarted or "
      + `died${n ? `; ${n} call(s) in flight may or may not have run` : ""}); the next call `
      + "reconnects"));
    this.kept.clear();
  }

  private failAll(err: SandboxError): void {
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(err);
    }
  }

  private onData(sock: net.Socket, chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf("\n")) >= 0) {
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + 1);
      if (!line.trim()) continue;
      let msg: unknown;
      try {
        msg = JSON.parse(line);
      } catch (err) {
        // The stream can no longer be trusted to be framed: fail everything, drop the socket.
        if (this.sock === sock) this.sock = null;
        sock.destroy();
        this.failAll(new ParseError(`sandboxd sent a line that is not JSON: ${String(err)}`));
        return;
      }
      for (const item of Array.isArray(msg) ? msg : [msg]) this.dispatch(item);
    }
  }

  private dispatch(item: unknown): void {
    if (item === null || typeof item !== "object") return;
    const msg = item as Record<string, unknown>;
    if (typeof msg.method === "string" && !("id" in msg)) {
      const params = (msg.params ?? {}) as Record<string, unknown>;
      const rid = Number(params.requestId);
      const pending = this.pending.get(rid);
      const handler = pending?.onNotification ?? this.kept.get(rid) ?? this.onNotification;
      try {
        handler?.({ method: msg.method, params } as unknown as AnyNotification);
      } catch (err) {
        // A callback that throws fails its own call (its late answer is then ignored), never
        // the reader: the other calls on the connection go on.
        if (pending !== undefined) {
          this.pending.delete(rid);
          clearTimeout(pending.timer);
          pending.reject(err);
        }
      }
      return;
    }
    if (!("result" in msg) && !("error" in msg)) return;
    const rid = typeof msg.id === "string" && /^\d+$/.test(msg.id) ? Number(msg.id) : msg.id;
    if (rid === null || rid === undefined) {
      // Unattributable (the server could not read an id): every call in flight learns of it.
      if ("error" in msg) this.failAll(this.outcomeError(msg.error, undefined));
      return;
    }
    const p = this.pending.get(rid as number);
    if (p === undefined) return; // timed out already
    this.pending.delete(rid as number);
    clearTimeout(p.timer);
    if (p.keep && p.onNotification !== undefined && !("error" in msg)) {
      this.kept.set(rid as number, p.onNotification);
    }
    if ("error" in msg) p.reject(this.outcomeError(msg.error, p.method));
    else p.resolve(msg.result);
  }

  private outcomeError(error: unknown, method: string | undefined): SandboxError {
    const err = error !== null && typeof error === "object"
      ? fromWire(error as WireError)
      : new ProtocolError(`malformed error object: ${JSON.stringify(error)}`);
    if (method !== undefined) err.method = method;
    return err;
  }
}
