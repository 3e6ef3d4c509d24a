"""Method handlers, one module per family (rooms, exec, files, git, code, stats, processes,
ports, backups, terminals, sessions, watches, contexts): thin layers over the room-level calls
(``rooms``, ``runs``, ``roomfiles``, ``processes``, ``ports``, ``persistence``, ``terminals``,
``sessions``, ``watches``, the code-run service).

:data:`HANDLERS` is the one table of them, by wire name; it has exactly the methods of
``protocol.METHODS`` (a unit test holds them equal), which says each one's params, result and
notifications. A handler takes a :class:`~sandboxd.context.Context` and its params struct and
returns its result struct; the server decodes, dispatches, encodes, and turns exceptions into
wire errors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .. import protocol
from ..context import Context
from . import (
    backups,
    code,
    contexts,
    exec,
    files,
    git,
    network,
    ports,
    processes,
    rooms,
    sessions,
    stats,
    terminals,
    watches,
)

#: A handler: (context, params struct) -> result struct. The params type differs per method,
#: so the table can only say Any; tests check each handler's annotations against METHODS.
Handler = Callable[[Context, Any], Awaitable[protocol.Result]]

HANDLERS: dict[str, Handler] = {
    "ping": rooms.ping,
    "getSandbox": rooms.get_sandbox,
    "listSandboxes": rooms.list_sandboxes,
    "destroy": rooms.destroy,
    "exec": exec.exec_,
    "writeFile": files.write_file,
    "readFile": files.read_file,
    "deleteFile": files.delete_file,
    "renameFile": files.rename_file,
    "moveFile": files.move_file,
    "mkdir": files.mkdir,
    "listFiles": files.list_files,
    "exists": files.exists,
    "gitCheckout": git.git_checkout,
    "runCode": code.run_code,
    "runExampleCode": code.run_example_code,
    "listLanguages": code.list_languages,
    "stats": stats.stats,
    "startProcess": processes.start_process,
    "getProcess": processes.get_process,
    "listProcesses": processes.list_processes,
    "getProcessLogs": processes.get_process_logs,
    "streamProcessLogs": processes.stream_process_logs,
    "killProcess": processes.kill_process,
    "killAllProcesses": processes.kill_all_processes,
    "waitForLog": processes.wait_for_log,
    "waitForPort": ports.wait_for_port,
    "exposePort": ports.expose_port,
    "unexposePort": ports.unexpose_port,
    "getExposedPorts": ports.get_exposed_ports,
    "createBackup": backups.create_backup,
    "restoreBackup": backups.restore_backup,
    "listBackups": backups.list_backups,
    "deleteBackup": backups.delete_backup,
    "forkSandbox": backups.fork_sandbox,
    "exportSandbox": backups.export_sandbox,
    "importSandbox": backups.import_sandbox,
    "openTerminal": terminals.open_terminal,
    "writeTerminal": terminals.write_terminal,
    "resizeTerminal": terminals.resize_terminal,
    "closeTerminal": terminals.close_terminal,
    "attachTerminal": terminals.attach_terminal,
    "listTerminals": terminals.list_terminals,
    "createSession": sessions.create_session,
    "deleteSession": sessions.delete_session,
    "listSessions": sessions.list_sessions,
    "createCodeContext": contexts.create_code_context,
    "runInContext": contexts.run_in_context,
    "listCodeContexts": contexts.list_code_contexts,
    "deleteCodeContext": contexts.delete_code_context,
    "restartCodeContext": contexts.restart_code_context,
    "interruptCodeContext": contexts.interrupt_code_context,
    "setNetworkPolicy": network.set_network_policy,
    "getNetworkLog": network.get_network_log,
    "watch": watches.watch,
    "unwatch": watches.unwatch,
}

__all__ = ["HANDLERS", "Context", "Handler"]
