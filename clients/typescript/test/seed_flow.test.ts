/** examples/seed-flow.ts against a daemon on the language rootfs: the seed's executeCode in all
 * 13 languages, its basic snippet and its CodeRunService snippet, outputs checked. */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { closeAll, getSandbox } from "../src/index.js";
import { LANGUAGES, basicCodeExecution, env, executeCode, installRunners, usingTheCodeRunService }
  from "../examples/seed-flow.js";
import { roomId } from "./helpers.js";

const HELLO: Record<string, [string, string]> = {
  javascript: ['console.log("Hello from JavaScript!");', "JavaScript"],
  typescript: ['const greeting: string = "Hello from TypeScript!";\nconsole.log(greeting);', "TypeScript"],
  python: ['print("Hello from Python!")', "Python"],
  php: ['<?php echo "Hello from PHP!\\n";', "PHP"],
  ruby: ['puts "Hello from Ruby!"', "Ruby"],
  java: ['public class Main { public static void main(String[] a) { System.out.println("Hello from Java!"); } }', "Java"],
  cpp: ['#include <iostream>\nint main() { std::cout << "Hello from C++!" << std::endl; }', "C++"],
  c: ['#include <stdio.h>\nint main(void) { puts("Hello from C!"); return 0; }', "C"],
  rust: ['fn main() { println!("Hello from Rust!"); }', "Rust"],
  go: ['package main\nimport "fmt"\nfunc main() { fmt.Println("Hello from Go!") }', "Go"],
  swift: ['print("Hello from Swift!")', "Swift"],
  kotlin: ['fun main() { println("Hello from Kotlin!") }', "Kotlin"],
  scala: ['object Main { def main(args: Array[String]): Unit = println("Hello from Scala!") }', "Scala"],
};

const room = roomId("seed-flow");
const sb = getSandbox(env.SANDBOX, room, { options: { limits: { memoryBytes: 2 * 1024 ** 3, pids: 512 } } });

before(async () => {
  await sb.get({ limits: { memoryBytes: 2 * 1024 ** 3, pids: 512 } });
  await installRunners(room);
});
after(async () => {
  for (const id of [room, "unique-sandbox-id", "room-123"]) {
    await getSandbox(env.SANDBOX, id).destroy().catch(() => undefined);
  }
  closeAll();
  env.SANDBOX.close();
});

describe("the seed's Complete Code Execution Flow, in 13 languages", () => {
  it("covers the seed's 13 languages", () => {
    assert.deepEqual(LANGUAGES.sort(), Object.keys(HELLO).sort());
  });
  for (const [language, [code, name]] of Object.entries(HELLO)) {
    it(language, async () => {
      const out = await executeCode(code, language, room);
      assert.equal(out.success, true, JSON.stringify(out));
      assert.equal(out.exitCode, 0, JSON.stringify(out));
      assert.equal("output" in out && out.output, `Hello from ${name}!\n`, JSON.stringify(out));
      // the flow's clean-up ran
      const left = await sb.exec("ls /workspace | grep '^code_' || true");
      assert.equal(left.stdout, "");
    });
  }
  it("an infinite loop takes the seed's timeout branch", async () => {
    env.SANDBOX.execTimeoutMs = 1000;
    try {
      const out = await executeCode("while True: pass", "python", room);
      assert.deepEqual(out, { success: false, output: "",
                              error: "Code execution timed out - possible infinite loop detected",
                              exitCode: -1 });
    } finally {
      env.SANDBOX.execTimeoutMs = 30000;
    }
  });

  it("a program that fails is reported with its exit code and stderr", async () => {
    const out = await executeCode("import sys; sys.stderr.write('bad\\n'); sys.exit(4)", "python", room);
    assert.deepEqual([out.success, out.exitCode, out.error], [true, 4, "bad\n"]);
  });
});

describe("the seed's snippets", () => {
  it("Basic Code Execution", async () => {
    const r = await basicCodeExecution();
    assert.deepEqual([r.stdout, r.exitCode, r.stderr], ["Hello World!\n", 0, ""]);
    assert.equal((await getSandbox(env.SANDBOX, "unique-sandbox-id").exists("script.js")).exists, false);
  });

  it("Using the CodeRunService", async () => {
    const { result, pythonResult, examples } = await usingTheCodeRunService();
    assert.deepEqual([result.stdout, result.success, result.status], ["Hello from JavaScript!\n", true, "OK"]);
    assert.deepEqual([pythonResult.stdout, pythonResult.exitCode], ["Hello from Python!\n", 0]);
    assert.equal(examples.length, 13);
    for (const e of examples) {
      assert.equal(e.available, true, `${e.language} is not available`);
      assert.equal(e.success, true, JSON.stringify(e));
      assert.equal(e.stdout, e.expected, e.language);
    }
  });
});
