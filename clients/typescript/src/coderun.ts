/**
 * The seed's `CodeRunService`: `runCode({roomId, code, language})` and `runExampleCode(roomId)`,
 * on sandboxd's `runCode` / `runExampleCode` (compile cached, limits, verdicts).
 */
import { SandboxdClient } from "./client.js";
import type * as P from "./protocol.js";
import { clientFor, type Target } from "./sandbox.js";

/** What the service is built from: a socket path, a client, or a context whose env has SANDBOX. */
export type CodeRunContext = Target | { env: { SANDBOX: Target } };

export interface RunCodeRequest {
  roomId: string;
  code: string;
  /** a language id or alias (listLanguages): javascript, typescript, python, ... */
  language: string;
  stdin?: string;
  args?: string[];
  files?: Record<string, string>;
  limits?: P.RunLimits;
}

export class CodeRunService {
  readonly client: SandboxdClient;

  constructor(ctx: CodeRunContext) {
    const target = typeof ctx === "string" || ctx instanceof SandboxdClient ? ctx : ctx.env.SANDBOX;
    this.client = clientFor(target);
  }

  /** Compile (cached) and run `code`; the result has `stdout`, `stderr`, `exitCode`, `success`
   *  and the verdict (`status`: OK RE SG TO ML OL XX, or CE with `compile`). */
  runCode(req: RunCodeRequest): Promise<P.RunCodeResult> {
    const { roomId, ...rest } = req;
    return this.client.call("runCode", { sandboxId: roomId, ...rest });
  }

  /** A hello world in every language, each with its `expected` output. */
  async runExampleCode(roomId: string): Promise<P.ExampleResult[]> {
    return (await this.client.call("runExampleCode", { sandboxId: roomId })).results;
  }

  async listLanguages(): Promise<P.LanguageInfo[]> {
    return (await this.client.call("listLanguages", {})).languages;
  }
}
