/**
 * The seed's own code against sandboxd (examples/seed-cloudflare-sandbox.md, "Basic Code
 * Execution", "Using the CodeRunService" and "Example: Complete Code Execution Flow"), VERBATIM:
 * only the import lines differ. `env.SANDBOX` (a Workers binding in the seed) is sandboxd's
 * socket here, and `ctx` (a Durable Object context) a context whose env has it, so even the
 * `getSandbox(env.SANDBOX, ...)` targets are the seed's text. tests/integration/test_ts_client.py
 * checks the verbatim part and runs every function here for all 13 languages.
 *
 * Not in the seed, so written here: `getFileExtension` and `getExecutionCommand` (the seed's
 * table of extensions and commands). Its commands for compiled languages (`g++ file.cpp`) only
 * compile, so for those `getExecutionCommand` names a small runner script that compiles, then
 * runs, and `installRunners(roomId)` puts the scripts into the room first.
 */
import { CodeRunService, SandboxdClient, defaultSocket, getSandbox } from '@sandboxd/client';

/** The seed's binding: a client of sandboxd's socket ($SANDBOXD_SOCKET, else the default one),
 *  with the SDK's "automatic timeout protection": an exec that gives no timeout gets 30 s. */
export const env = {
	SANDBOX: new SandboxdClient(process.env.SANDBOXD_SOCKET ?? defaultSocket(), { execTimeoutMs: 30000 }),
};
/** The seed's context: CodeRunService takes one whose env has SANDBOX. */
export const ctx = { env };

// --- the seed's table: "Supported Programming Languages" ------------------------------------

const EXTENSIONS: Record<string, string> = {
	javascript: 'js', typescript: 'ts', python: 'py', php: 'php', ruby: 'rb', java: 'java',
	cpp: 'cpp', c: 'c', rust: 'rs', go: 'go', swift: 'swift', kotlin: 'kt', scala: 'scala',
};

/** Runs the file in argv form as the seed's table says, where one command does. */
const DIRECT: Record<string, string> = {
	javascript: 'node', typescript: 'ts-node', python: 'python3', php: 'php', ruby: 'ruby',
	// Java 11+ runs a single source file directly (any public class name).
	java: 'java',
};

const RUNNER_DIR = '/workspace/.seed-run';

/** Compile, then run: the seed's compiler commands with the flags sandboxd's runCode uses. */
const RUNNERS: Record<string, string> = {
	cpp: 'g++ -std=gnu++20 -O2 -pipe -o "$d/main" "$1" && exec "$d/main"',
	c: 'gcc -std=gnu17 -O2 -pipe -o "$d/main" "$1" -lm && exec "$d/main"',
	rust: 'rustc --edition 2021 -C opt-level=2 -o "$d/main" "$1" && exec "$d/main"',
	go: 'GOCACHE="$d/.gocache" GOCACHEPROG="/usr/lib/sandboxd/bin/go-cacheprog /usr/lib/sandboxd/go-cache" '
		+ 'GOPATH=/tmp/go GOTOOLCHAIN=local GOPROXY=off GOFLAGS= CGO_ENABLED=0 '
		+ 'go build -buildmode=exe -o "$d/main" "$1" && exec "$d/main"',
	swift: 'swiftc -O -o "$d/main" "$1" && exec "$d/main"',
	// kotlinc names the class after the file: compile it as main.kt to run MainKt.
	kotlin: 'cp "$1" "$d/main.kt" && java -XX:SharedArchiveFile=/usr/lib/sandboxd/cds/kotlinc.jsa '
		+ '-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData '
		+ '-cp /usr/share/java/kotlin-compiler.jar:/usr/share/java/libtrove-intellij.jar '
		+ 'org.jetbrains.kotlin.cli.jvm.K2JVMCompiler -kotlin-home /usr/share/kotlin/kotlinc '
		+ '-no-reflect -d "$d" "$d/main.kt" '
		+ '&& exec java -XX:+UseSerialGC -XX:-UsePerfData -cp "/usr/share/java/kotlin-stdlib.jar:$d" MainKt',
	scala: 'java -XX:SharedArchiveFile=/usr/lib/sandboxd/cds/scalac.jsa -XX:+UseSerialGC '
		+ '-XX:TieredStopAtLevel=1 -XX:-UsePerfData -cp /usr/share/java/scala-compiler.jar:'
		+ '/usr/share/java/scala-library.jar:/usr/share/java/scala-reflect.jar '
		+ '-Dscala.usejavacp=true scala.tools.nsc.Main -d "$d" "$1" '
		+ '&& exec java -XX:+UseSerialGC -XX:-UsePerfData -cp "/usr/share/java/scala-library.jar:$d" Main',
};

export const LANGUAGES = Object.keys(EXTENSIONS);

export function getFileExtension(language: string): string {
	const ext = EXTENSIONS[language];
	if (ext === undefined) throw new Error(`unsupported language: ${language}`);
	return ext;
}

export function getExecutionCommand(language: string): string {
	return DIRECT[language] ?? `${RUNNER_DIR}/${language}`;
}

/** Put the compile-and-run scripts of getExecutionCommand into room `roomId`. */
export async function installRunners(roomId: string): Promise<void> {
	const sandbox = getSandbox(env.SANDBOX, roomId);
	await sandbox.mkdir(RUNNER_DIR, { recursive: true });
	for (const [language, body] of Object.entries(RUNNERS)) {
		const script = `#!/bin/sh\nd=$(mktemp -d)\n${body}\n`;
		await sandbox.writeFile(`${RUNNER_DIR}/${language}`, script, { encoding: 'utf8' });
	}
	const chmod = await sandbox.exec('chmod', ['+x', ...Object.keys(RUNNERS).map((l) => `${RUNNER_DIR}/${l}`)]);
	if (chmod.exitCode !== 0) throw new Error(`chmod: ${chmod.stderr}`);
}

// --- "Basic Code Execution", verbatim ---------------------------------------------------------

export async function basicCodeExecution() {
const sandbox = getSandbox(env.SANDBOX, 'unique-sandbox-id');

// Write code to a file
await sandbox.writeFile('script.js', 'console.log("Hello World!");', { encoding: 'utf8' });

// Execute the code
const result = await sandbox.exec('node', ['script.js']);

// Clean up
await sandbox.deleteFile('script.js', {});

// Handle the result
if (result && typeof result === 'object' && 'stdout' in result) {
	console.log('Output:', result.stdout);
	console.log('Exit code:', result.exitCode);
	console.log('Errors:', result.stderr);
}
return result;
}

// --- "Using the CodeRunService", verbatim -----------------------------------------------------

export async function usingTheCodeRunService() {
const codeRunService = new CodeRunService(ctx);

// Run JavaScript code
const result = await codeRunService.runCode({
	roomId: 'room-123',
	code: 'console.log("Hello from JavaScript!");',
	language: 'javascript',
});

// Run Python code
const pythonResult = await codeRunService.runCode({
	roomId: 'room-123',
	code: 'print("Hello from Python!")',
	language: 'python',
});

// Run example code in multiple languages
const examples = await codeRunService.runExampleCode('room-123');
return { result, pythonResult, examples };
}

// --- "Example: Complete Code Execution Flow", verbatim ----------------------------------------

async function executeCode(code: string, language: string, roomId: string) {
	const sandbox = getSandbox(env.SANDBOX, roomId);

	try {
		// 1. Create a unique filename
		const fileName = `code_${Date.now()}.${getFileExtension(language)}`;

		// 2. Write code to sandbox
		await sandbox.writeFile(fileName, code, { encoding: 'utf8' });

		// 3. Execute the code (with automatic timeout protection)
		const command = getExecutionCommand(language);
		const result = await sandbox.exec(command, [fileName]);

		// 4. Clean up
		await sandbox.deleteFile(fileName, {});

		// 5. Process results
		if (result && typeof result === 'object' && 'stdout' in result) {
			// Check for timeout
			if (result.exitCode === -1 && result.stderr.includes('timed out')) {
				return {
					success: false,
					output: '',
					error: 'Code execution timed out - possible infinite loop detected',
					exitCode: -1,
				};
			}

			return {
				success: true,
				output: result.stdout,
				error: result.stderr,
				exitCode: result.exitCode,
			};
		}

		return { success: false, error: 'Execution failed' };
	} catch (error) {
		return {
			success: false,
			error: error instanceof Error ? error.message : 'Unknown error',
		};
	}
}

export { executeCode };
