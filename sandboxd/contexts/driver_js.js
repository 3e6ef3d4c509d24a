// sandboxd: the JavaScript / TypeScript code-context driver. Runs INSIDE the room as
// `node -e <this file> <language>`, started by `sh -c 'exec node ... 3>&1 1>&2'`: fd 3 is the
// channel to the daemon, fd 1 is the run's stderr, so nothing a cell or its children write by fd
// can reach the channel. Same JSON lines as driver_py.py (in on fd 0: run / interrupt / restart;
// out on fd 3: ready / out / result / done / restarted).
//
// Evaluation is node:repl's own (its eval: top-level await, let/const/function/class persisting
// in the context, the value of the last expression) in a vm context of its own; console.* and
// process.stdout/stderr.write in the cell go to the cell's logs. TypeScript is transpiled per
// cell by typescript's transpileModule (syntax only, no type check: the cost of one cell is a
// parse and an emit, not a program build).
"use strict";
const fs = require("fs");
const repl = require("repl");
const util = require("util");
const vm = require("vm");
const { PassThrough, Writable } = require("stream");
const { Console } = require("console");

const LANG = process.argv[process.argv.length - 1] === "typescript" ? "typescript" : "javascript";
let ts = null;
if (LANG === "typescript") {
  // Debian's node finds /usr/share/nodejs (node-typescript) itself; another build of node (a
  // host with NodeSource's) does not look there
  try {
    ts = require("typescript");
  } catch (_e) {
    ts = require("/usr/share/nodejs/typescript");
  }
}

function send(obj) {
  const data = Buffer.from(JSON.stringify(obj) + "\n");
  let off = 0;
  while (off < data.length) {
    try {
      off += fs.writeSync(3, data, off);
    } catch (e) {
      if (e.code !== "EAGAIN") throw e;
    }
  }
}

let current = null; // the running cell's id
function sink(stream) {
  return new Writable({
    write(chunk, _enc, cb) {
      send({ ev: "out", id: current, stream, text: chunk.toString() });
      cb();
    },
  });
}
const outS = sink("stdout");
const errS = sink("stderr");
process.stdout.write = (chunk, enc, cb) => outS.write(chunk, enc, cb);
process.stderr.write = (chunk, enc, cb) => errS.write(chunk, enc, cb);

let server = null;
function fresh() {
  server = repl.start({ input: new PassThrough(), output: new PassThrough(), terminal: false,
                        prompt: "", useGlobal: false, ignoreUndefined: false,
                        breakEvalOnSigint: false });
  server.context.console = new Console({ stdout: outS, stderr: errS });
  server.context.require = require;
  // node:repl hands a cell's uncaught error (thrown, or an awaited rejection) to its domain, not
  // to eval's callback: its own handler prints it to the (discarded) output; ours ends the cell
  server._domain.on("error", (e) => {
    if (busy) finishCell(e);
  });
}
fresh();

function transpile(code) {
  const out = ts.transpileModule(code, {
    reportDiagnostics: true,
    compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.CommonJS,
                       isolatedModules: true, removeComments: false },
  });
  const diags = (out.diagnostics || []).filter((d) => d.category === ts.DiagnosticCategory.Error);
  if (diags.length) {
    const msg = diags.map((d) => {
      const text = ts.flattenDiagnosticMessageText(d.messageText, "\n");
      if (d.file && d.start !== undefined) {
        const { line, character } = d.file.getLineAndCharacterOfPosition(d.start);
        return `cell.ts(${line + 1},${character + 1}): error TS${d.code}: ${text}`;
      }
      return `error TS${d.code}: ${text}`;
    });
    const err = new SyntaxError(msg[0]);
    err.stack = "SyntaxError: " + msg.join("\n");
    throw err;
  }
  // (a file with import/export is a module: the CommonJS prologue is harmless in the context,
  // but "use strict" would make the cell's top-level declarations block-scoped to it)
  return out.outputText.replace(/^"use strict";\s*/, "").replace(/^export \{\};\s*$/m, "");
}

function errorOf(e) {
  if (e && e.code === "ERR_SCRIPT_EXECUTION_INTERRUPTED") {
    return { name: "KeyboardInterrupt", value: "interrupted", traceback: [] };
  }
  if (e instanceof Error || (e && typeof e === "object" && "stack" in e)) {
    const stack = String(e.stack || `${e.name}: ${e.message}`).split("\n");
    return { name: String(e.name || "Error"), value: String(e.message || ""), traceback: stack };
  }
  return { name: "Error", value: util.inspect(e), traceback: ["Uncaught " + util.inspect(e)] };
}

function bundleOf(value) {
  const b = { "text/plain": util.inspect(value, { depth: 4, colors: false }) };
  if (value !== null && typeof value === "object") {
    try {
      const j = JSON.stringify(value);
      if (j !== undefined && j.length < (1 << 20)) b["application/json"] = JSON.parse(j);
    } catch (_e) { /* not JSON: text/plain only */ }
  }
  return b;
}

let count = 0;
let busy = false;
let finishCell = () => {};
function runCell(id, code) {
  busy = true;
  current = id;
  count += 1;
  const n = count;
  const finish = (err, value) => {
    if (!busy || current !== id) return; // (already ended: the domain's error came first)
    // output written during the cell is flushed (the sinks are synchronous) before done
    if (!err && value !== undefined) send({ ev: "result", id, data: bundleOf(value) });
    send({ ev: "done", id, count: n, error: err ? errorOf(err) : null });
    busy = false;
    current = null;
  };
  finishCell = (e) => finish(e);
  let src;
  try {
    src = LANG === "typescript" ? transpile(code) : code;
  } catch (e) {
    finish(e);
    return;
  }
  // A cell without top-level await runs as a vm script in the REPL's context (what node:repl
  // does too), with breakOnSigint: a SIGINT breaks even a synchronous loop, in place. Only a cell
  // that needs await goes through node:repl's eval (its await transform); it yields to the event
  // loop, where our SIGINT handler ends it.
  let script = null;
  const filename = `cell[${n}]`;
  const wrapped = /^\s*\{/.test(src) && /\}\s*;?\s*$/.test(src) ? `(${src})` : null;
  for (const text of wrapped ? [wrapped, src] : [src]) {
    try {
      script = new vm.Script(text, { filename });
      break;
    } catch (e) {
      if (text === wrapped) continue; // (not an object literal: a block)
      if (!(e instanceof SyntaxError && /await/.test(e.message))) {
        finish(e);
        return;
      }
    }
  }
  if (script !== null) {
    try {
      finish(null, script.runInContext(server.context, { breakOnSigint: true,
                                                         displayErrors: false }));
    } catch (e) {
      finish(e);
    }
    return;
  }
  try {
    server.eval(src, server.context, filename, (err, value) => {
      if (err && err.name === "Recoverable") err = err.err || new SyntaxError("Unexpected end of input");
      finish(err, value);
    });
  } catch (e) {
    finish(e);
  }
}

let buf = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  buf += chunk;
  let i;
  while ((i = buf.indexOf("\n")) >= 0) {
    const line = buf.slice(0, i);
    buf = buf.slice(i + 1);
    if (!line.trim()) continue;
    const cmd = JSON.parse(line);
    if (cmd.op === "run") {
      if (busy) {
        send({ ev: "done", id: cmd.id, count: null,
               error: { name: "ContextBusy", value: "a cell is running", traceback: [] } });
      } else {
        runCell(cmd.id, String(cmd.code || ""));
      }
    } else if (cmd.op === "restart") {
      // a JS context's state is its vm context: a new one is a restart (the daemon restarts
      // the whole process when a cell does not give the event loop back)
      fresh();
      count = 0;
      busy = false;
      send({ ev: "restarted", id: cmd.id, reason: "restart" });
    }
    // "interrupt": a cell blocking the event loop never lets us read it; the daemon sends
    // SIGINT instead (breakOnSigint, or the handler below)
  }
});
process.stdin.on("end", () => process.exit(0));
// SIGINT while the event loop is ours (an awaiting cell): the cell ends as interrupted; what it
// awaited may still settle later, and is then ignored.
process.on("SIGINT", () => {
  if (busy && current !== null) {
    send({ ev: "done", id: current, count, error: { name: "KeyboardInterrupt",
      value: "interrupted", traceback: [] } });
    busy = false;
    current = null;
  }
});
send({ ev: "ready" });
