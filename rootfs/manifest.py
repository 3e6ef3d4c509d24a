"""Runs inside the tree (its own python3): collects toolchain versions into a JSON manifest."""

import json
import os
import re
import subprocess
import sys
import time

# id -> (Debian package, version command, regex for the version in its output)
TOOLCHAINS = {
    "javascript": ("nodejs", ["node", "--version"], r"v?(\d+\.\d+\.\d+)"),
    "typescript": ("node-typescript", ["tsc", "--version"], r"(\d+\.\d+\.\d+)"),
    "ts-node": ("ts-node", ["ts-node", "--version"], r"(\d+\.\d+\.\d+)"),
    "python": ("python3", ["python3", "--version"], r"(\d+\.\d+\.\d+)"),
    "php": ("php-cli", ["php", "--version"], r"PHP (\d+\.\d+\.\d+)"),
    "ruby": ("ruby", ["ruby", "--version"], r"ruby (\d+\.\d+\.\d+)"),
    "java": ("default-jdk-headless", ["javac", "-version"], r"javac (\S+)"),
    "cpp": ("g++", ["g++", "--version"], r"(\d+\.\d+\.\d+)"),
    "c": ("gcc", ["gcc", "--version"], r"(\d+\.\d+\.\d+)"),
    "rust": ("rustc", ["rustc", "--version"], r"rustc (\S+)"),
    "go": ("golang-go", ["go", "version"], r"go(\d+\.\d+(?:\.\d+)?)"),
    "swift": ("swiftlang", ["swiftc", "--version"], r"Swift version (\S+)"),
    "kotlin": ("kotlin", ["kotlinc", "-version"], r"kotlinc-jvm (\S+)"),
    "scala": ("scala", ["scalac", "-version"], r"version (\d+\.\d+\.\d+)"),
}


def package_version(pkg: str) -> str | None:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def _line_of(text: str, m: "re.Match[str] | None") -> str:
    """The output line that holds the version (JVM warnings may come first)."""
    if m is None:
        return text.splitlines()[0] if text else ""
    start = text.rfind("\n", 0, m.start()) + 1
    end = text.find("\n", m.end())
    return text[start:] if end < 0 else text[start:end]


def main() -> int:
    dest = sys.argv[1]
    langs = {}
    failed = []
    for lang, (pkg, cmd, rx) in TOOLCHAINS.items():
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            text = (out.stdout + out.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            text = f"error: {err}"
        m = re.search(rx, text)
        if m is None:
            failed.append(lang)
        version = m.group(1) if m else None
        pkg_version = package_version(pkg)
        if version and "SNAPSHOT" in version and pkg_version:
            # Debian's Kotlin calls itself "1.3-SNAPSHOT"; its package knows it is 1.3.31.
            version = re.split(r"[-+~]", re.sub(r"^\d+:", "", pkg_version))[0]
        langs[lang] = {
            "version": version,
            "versionOutput": _line_of(text, m),
            "package": pkg,
            "packageVersion": pkg_version,
        }
    with open("/etc/os-release") as f:
        osr = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    manifest = {
        "schema": 1,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "os": osr.get("PRETTY_NAME", "").strip('"'),
        "suite": osr.get("VERSION_CODENAME", ""),
        "languages": langs,
    }
    tmp = dest + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    os.rename(tmp, dest)
    if failed:
        print("manifest: no version for " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
