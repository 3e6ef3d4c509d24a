#!/usr/bin/env python3
"""The seed's "complete code execution flow": write a uniquely named file, run it, delete it.

    python examples/code_execution_flow.py [--socket PATH] [--room ID] [CODE]

Prints ``{"success", "output", "error", "exitCode"}`` as JSON (the shape the Cloudflare Sandbox
SDK example returns). The file is removed even when the run fails; the room is created on
demand and kept (destroy it with ``sandboxctl destroy ID``).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

from sandboxd import errors
from sandboxd.client import Client

DEFAULT_CODE = ('import sys\nprint("Hello from the sandbox!")\n'
                'print(sum(range(10)), file=sys.stderr)\n')


def execute_python(sandbox: Any, code: str) -> dict[str, Any]:
    """Write ``code`` to a uniquely named file, run it with python3, delete it."""
    path = f"/workspace/run_{uuid.uuid4().hex}.py"
    sandbox.write_file(path, code)
    try:
        result = sandbox.exec("python3", [path], timeout=30)
        return {"success": result.exit_code == 0, "output": result.stdout,
                "error": result.stderr, "exitCode": result.exit_code}
    finally:
        sandbox.delete_file(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", help="sandboxd socket (default: the client's default)")
    ap.add_argument("--room", default="example-flow", help="sandbox id (default example-flow)")
    ap.add_argument("code", nargs="?", default=DEFAULT_CODE, help="Python source to run")
    args = ap.parse_args()
    try:
        with Client(args.socket, timeout=60) as client:
            out = execute_python(client.sandbox(args.room), args.code)
    except errors.SandboxError as err:
        print(json.dumps({"success": False, "output": "", "error": err.message,
                          "exitCode": -1, "code": err.code}))
        return 1
    print(json.dumps(out))
    return 0 if out["success"] else 1


if __name__ == "__main__":
    sys.exit(main())
