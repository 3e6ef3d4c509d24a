"""Issue 24's hand-made mutants of the validators and verdicts, re-run on demand.

Each mutant is one textual edit of one module (flip a comparison, drop a check). For each, the
edit is applied in place, the unit tests named for it run (no root, seconds), and the module is
restored, whatever happens. A mutant no test kills is a *survivor*: printed, and the exit code is
1. Run from the checkout with the project's venv:

    python bench/mutants.py            # all
    python bench/mutants.py C01 S08    # some

The integration-tier twin of V01 (an argv-form hog really OOM-killed) is
tests/integration/test_limits.py::test_argv_form_memory_hog_killed_by_the_kernel_is_ml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
UNIT = "tests/unit/test_validation.py"

# id: (module, original text, mutated text, what it means)
MUTANTS: dict[str, tuple[str, str, str, str]] = {
    "V01": ("sandboxd/runs.py", "    elif oom:\n        res.status, res.limit_exceeded = \"ML\"",
            "    elif oom and sig is None:\n        res.status, res.limit_exceeded = \"ML\"",
            "an OOM-killed main process (signalled) reported SG, not ML"),
    "C01": ("sandboxd/config.py", "not SANDBOX_ID_RE.fullmatch(value)",
            "not SANDBOX_ID_RE.match(value)", "a sandbox id ending in a newline accepted"),
    "C03": ("sandboxd/config.py", "[A-Za-z0-9_-]{0,61}", "[A-Za-z0-9_.-]{0,61}",
            "'.' accepted inside a sandbox id"),
    "A01": ("sandboxd/roomfiles.py", "if len(path) > protocol.MAX_PATH:",
            "if len(path) >= protocol.MAX_PATH:", "a 4096-character path refused"),
    "A01b": ("sandboxd/roomfiles.py", "if len(path) > protocol.MAX_PATH:",
             "if len(path) > protocol.MAX_PATH + 1:", "a 4097-character path accepted"),
    "A02": ("sandboxd/roomfiles.py", "    if not stat.S_ISREG(st.st_mode):\n        raise errors."
            "PermissionDenied(f\"{path}: not a regular file\"",
            "    if False:\n        raise errors.PermissionDenied(f\"{path}: not a regular file\"",
            "the daemon-side regular-file check disabled"),
    "A03": ("sandboxd/roomfiles.py", "    errno.ELOOP: errors.PermissionDenied,", "",
            "ELOOP no longer reported as permission denied"),
    "F04": ("sandboxd/jail/fileops.py", "        st = _check_fs(fd, path)\n        if not stat."
            "S_ISREG(st.st_mode):", "        st = _check_fs(fd, path)\n        if False:",
            "the file API's regular-file check after open dropped"),
    "S08": ("sandboxd/jail/seccomp.py",
            "SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_TSYNC_ESRCH)",
            "SECCOMP_FILTER_FLAG_TSYNC)", "the seccomp filter installed without TSYNC_ESRCH"),
    "G01": ("sandboxd/jail/cgroup/tree.py", "max(1000, round(cpus * CPU_PERIOD_US))",
            "round(cpus * CPU_PERIOD_US)", "the 1 ms cpu-quota floor removed"),
    "E01": ("sandboxd/roomfiles.py", "_ERRNO_VALIDATION = {errno.EINVAL, errno.ENAMETOOLONG,",
            "_ERRNO_VALIDATION = {errno.EINVAL,", "ENAMETOOLONG no longer a validation error"),
    "R01": ("sandboxd/runs.py", "        if \"\\x00\" in a:\n", "        if False:\n",
            "a NUL byte in an argument accepted"),
    "U01": ("sandboxd/api/git.py", ' or "::" in url)', ")",
            "remote-helper transports (ext::, fd::) accepted as git URLs"),
    "U02": ("sandboxd/api/git.py", 'or url.startswith("-")\n', "\n",
            "a git URL git would parse as an option accepted"),
    "B01": ("sandboxd/api/git.py", "(^-)|(\\.\\.)|", "(\\.\\.)|",
            "a branch name starting with '-' (an option to git) accepted"),
}


def run(mid: str) -> bool:
    """True when a test killed mutant ``mid``."""
    rel, old, new, _ = MUTANTS[mid]
    path = TOP / rel
    original = path.read_text()
    if original.count(old) != 1:
        raise SystemExit(f"{mid}: the text to mutate is not in {rel} exactly once (moved?)")
    try:
        path.write_text(original.replace(old, new))
        res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                              "-x", "--no-header", UNIT], cwd=TOP, capture_output=True,
                             text=True, check=False)
    finally:
        path.write_text(original)
    killers = [ln.split(" ", 1)[1].split(" - ")[0] for ln in res.stdout.splitlines()
               if ln.startswith("FAILED ")]
    print(f"{mid:5} {'killed' if res.returncode else 'SURVIVED':8} {MUTANTS[mid][3]}"
          + (f"  <- {killers[0]}" if killers else ""), flush=True)
    return res.returncode != 0


def main(ids: list[str]) -> int:
    survivors = [m for m in (ids or list(MUTANTS)) if not run(m)]
    print(f"{len(survivors)} survivor(s){': ' + ' '.join(survivors) if survivors else ''}")
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
