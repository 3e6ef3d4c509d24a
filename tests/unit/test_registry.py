"""The language registry: the packaged languages.toml, the loader's validation, and (marked
``rootfs``) every example compiled and run bare on the built runtime tree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import skip_unless_ci

from sandboxd.coderun.registry import (
    PLACEHOLDERS,
    Language,
    Registry,
    load_registry,
    parse_registry,
)
from sandboxd.errors import InternalError, UnsupportedLanguage

REPO = Path(__file__).resolve().parents[2]
IDS = [
    "javascript", "typescript", "python", "php", "ruby", "java", "cpp", "c", "rust", "go",
    "swift", "kotlin", "scala",
]
COMPILED = {"typescript", "java", "cpp", "c", "rust", "go", "swift", "kotlin", "scala"}
NAMES = {
    "javascript": "JavaScript", "typescript": "TypeScript", "python": "Python", "php": "PHP",
    "ruby": "Ruby", "java": "Java", "cpp": "C++", "c": "C", "rust": "Rust", "go": "Go",
    "swift": "Swift", "kotlin": "Kotlin", "scala": "Scala",
}


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


# --- the packaged registry ---------------------------------------------------------------------


def test_has_exactly_the_thirteen_languages_in_order(registry: Registry) -> None:
    assert registry.ids == tuple(IDS)
    assert len(registry) == 13
    assert [lang.id for lang in registry] == IDS


@pytest.mark.parametrize(
    ("alias", "lang_id"),
    [("js", "javascript"), ("ts", "typescript"), ("py", "python"), ("c++", "cpp"),
     ("rs", "rust"), ("golang", "go"), ("kt", "kotlin"), ("node", "javascript"),
     ("python3", "python"), ("rb", "ruby"), ("C++", "cpp"), ("  Go ", "go"), ("JAVA", "java"),
     *[(i, i) for i in IDS]],
)
def test_resolve_ids_and_aliases(registry: Registry, alias: str, lang_id: str) -> None:
    assert registry.resolve(alias).id == lang_id
    assert alias in registry


@pytest.mark.parametrize("name", ["cobol", "", "c#", "javascript2", "typescript.js", "j s"])
def test_unknown_language_lists_the_supported_ids(registry: Registry, name: str) -> None:
    with pytest.raises(UnsupportedLanguage) as info:
        registry.resolve(name)
    err = info.value
    assert err.code == "UNSUPPORTED_LANGUAGE"
    assert err.context["supported"] == IDS
    assert err.context["language"] == name
    for lang_id in IDS:
        assert lang_id in err.message
    assert err.to_wire()["data"]["supported"] == IDS
    assert name not in registry


@pytest.mark.parametrize("lang_id", IDS)
def test_each_language_is_complete(registry: Registry, lang_id: str) -> None:
    lang: Language = registry.resolve(lang_id)
    assert lang.name == NAMES[lang_id]
    assert f"Hello from {lang.name}!" in lang.example
    assert lang.expected_example_output == f"Hello from {lang.name}!\n"
    assert lang.source_file.endswith("." + lang.extension)
    assert lang.compiled == (lang_id in COMPILED)
    assert (lang.compile_limits is not None) == lang.compiled
    assert lang.version_argv
    assert lang.env["HOME"] == "/root"
    assert lang.env["PATH"].startswith("/usr/local/bin:")
    assert lang.env["TMPDIR"] == "/tmp"
    # Every writable path the env names is under the room's writable mounts.
    for key, value in lang.env.items():
        if key.endswith(("CACHE", "PATH", "HOME")) and key != "PATH" and value.startswith("/"):
            assert value.startswith(("/tmp", "/root", "/home", "/workspace")), key


@pytest.mark.parametrize("lang_id", IDS)
def test_placeholders_are_filled(registry: Registry, lang_id: str) -> None:
    lang = registry.resolve(lang_id)
    run = lang.run_argv("/workspace/r1/")
    comp = lang.compile_argv("/workspace/r1")
    for argv in (run, comp or []):
        assert not any(re.search(r"\{[a-z]+\}", a) for a in argv), argv
    if lang.compiled:
        assert comp is not None
        assert f"/workspace/r1/{lang.source_file}" in comp
    else:
        assert comp is None
        assert f"/workspace/r1/{lang.source_file}" in run


def test_java_needs_main_java_and_the_class_name(registry: Registry) -> None:
    java = registry.resolve("java")
    assert java.source_file == "Main.java"
    assert "public class Main" in java.example
    assert java.run_argv("/w")[-1] == "Main"


def test_native_programs_run_their_output(registry: Registry) -> None:
    for lang_id in ("c", "cpp", "rust", "go", "swift"):
        lang = registry.resolve(lang_id)
        argv = lang.compile_argv("/w")
        assert argv is not None and "/w/main" in argv
        assert lang.run_argv("/w") == ["/w/main"]


def test_compilers_that_need_more_memory_get_it(registry: Registry) -> None:
    default = registry.resolve("c").compile_limits
    assert default is not None
    for lang_id in ("java", "kotlin", "scala", "swift"):
        limits = registry.resolve(lang_id).compile_limits
        assert limits is not None
        assert limits.memory_bytes >= 1 << 30 > default.memory_bytes
        assert limits.wall_time_ms >= default.wall_time_ms


def test_go_uses_the_prebuilt_cache_and_never_the_network(registry: Registry) -> None:
    # One GOCACHE per build, in its (sealed) directory: never one shared by a room's compiles.
    env = registry.resolve("go").env_for("/tmp/.sandboxd/go-x")
    assert env["GOCACHE"] == "/tmp/.sandboxd/go-x/.gocache"
    assert env["GOCACHEPROG"].split() == [
        "/usr/lib/sandboxd/bin/go-cacheprog", "/usr/lib/sandboxd/go-cache"]
    assert env["GOTOOLCHAIN"] == "local"
    assert env["GOPROXY"] == "off"
    assert env["GOFLAGS"] == ""  # part of the cache key: must equal rootfs/customize.sh


def test_jvm_flags_match_the_cds_archives_of_the_rootfs(registry: Registry) -> None:
    """A CDS archive is ignored when the flags differ from the dump's: keep both files in step."""
    text = (REPO / "rootfs" / "customize.sh").read_text()
    match = re.search(r"^JVM_FLAGS=\((.*)\)$", text, re.M)
    assert match, "rootfs/customize.sh must define JVM_FLAGS=(...)"
    flags = match.group(1).split()
    archives = {"java": "javac", "kotlin": "kotlinc", "scala": "scalac"}
    for lang_id, jsa in archives.items():
        argv = registry.resolve(lang_id).compile_argv("/w")
        assert argv is not None
        prefix = "-J" if lang_id == "java" else ""
        assert f"{prefix}-XX:SharedArchiveFile=/usr/lib/sandboxd/cds/{jsa}.jsa" in argv
        for flag in flags:
            assert prefix + flag in argv, (lang_id, flag)
        assert f"ArchiveClassesAtExit=$CDS/{jsa}.jsa" in text
    kotlin_cp = re.search(r"^KOTLIN_CP=(\S+)$", text, re.M)
    scala_cp = re.search(r"^SCALA_CP=(\S+)$", text, re.M)
    assert kotlin_cp and scala_cp
    assert kotlin_cp.group(1) in (registry.resolve("kotlin").compile_argv("/w") or [])
    assert scala_cp.group(1) in (registry.resolve("scala").compile_argv("/w") or [])


def test_registry_is_immutable(registry: Registry) -> None:
    lang = registry.resolve("go")
    assert {lang, registry.resolve("golang")} == {lang}  # hashable, usable as a key
    with pytest.raises(AttributeError):
        lang.name = "Gopher"  # type: ignore[misc]
    with pytest.raises(TypeError):
        lang.env["GOPROXY"] = "https://example.invalid"  # type: ignore[index]
    with pytest.raises(TypeError):
        registry.languages["x"] = lang  # type: ignore[index]


def test_load_registry_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "langs.toml"
    path.write_text(_minimal())
    reg = load_registry(path)
    assert reg.ids == ("lua",)
    with pytest.raises(InternalError, match="cannot read"):
        load_registry(tmp_path / "missing.toml")


# --- validation --------------------------------------------------------------------------------


def _minimal(extra: str = "", top: str = "", lang_id: str = "lua") -> str:
    return f"""
schemaVersion = 1
{top}
[defaults.compileLimits]
memoryBytes = 100
wallTimeMs = 10
cpuTimeMs = 10

[languages.{lang_id}]
name = "Lua"
extension = "lua"
sourceFile = "main.lua"
run = ["lua", "{{src}}"]
version = ["lua", "-v"]
example = 'print("Hello from Lua!")'
{extra}
"""


def test_minimal_registry_and_defaults() -> None:
    reg = parse_registry(_minimal(top='[defaults.env]\nHOME = "/root"\n'))
    lua = reg.resolve("LUA")
    assert lua.aliases == ()
    assert lua.output_name == "main"
    assert lua.compile is None and lua.compile_limits is None
    assert dict(lua.env) == {"HOME": "/root"}


def test_compile_limits_merge_over_the_defaults() -> None:
    reg = parse_registry(_minimal('compile = ["luac", "-o", "{out}", "{src}"]\n'
                                  "[languages.lua.compileLimits]\nmemoryBytes = 999\n"))
    limits = reg.resolve("lua").compile_limits
    assert limits is not None
    assert (limits.memory_bytes, limits.wall_time_ms, limits.cpu_time_ms) == (999, 10, 10)
    assert reg.resolve("lua").compile_argv("/d") == ["luac", "-o", "/d/main", "/d/main.lua"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (_minimal("colour = 1"), "colour is not a known key"),
        (_minimal('compile = ["x", "{source}"]'), "unknown placeholder {source}"),
        (_minimal('aliases = ["lua"]'), "names both"),
        (_minimal("[languages.lua.compileLimits]\nmemoryBytes = 1"), "no compile command"),
        (_minimal('compile = ["x"]\n[languages.lua.compileLimits]\nmemoryBytes = -1'),
         "positive integer"),
        (_minimal('compile = ["x"]\n[languages.lua.compileLimits]\nmemoryBytes = true'),
         "positive integer"),
        (_minimal().replace('sourceFile = "main.lua"', 'sourceFile = "../main.lua"'),
         "not a plain file name"),
        (_minimal().replace('sourceFile = "main.lua"', 'sourceFile = "main.py"'),
         "must end with .lua"),
        (_minimal().replace('run = ["lua", "{src}"]', "run = []"), "non-empty list"),
        (_minimal().replace('run = ["lua", "{src}"]', 'run = "lua main.lua"'), "non-empty list"),
        (_minimal().replace('name = "Lua"\n', ""), "name is missing"),
        (_minimal().replace("schemaVersion = 1", "schemaVersion = 2"), "reads 1"),
        (_minimal(lang_id="Lua"), "not a valid language id"),
        (_minimal('env = { HOME = 1 }'), "table of string values"),
        (_minimal().replace("[defaults.compileLimits]", "[defaults.limits]"),
         "defaults.compileLimits is missing"),
        (_minimal(top="[defaults.env]\nX = 'y'\n[defaults.extra]\n"), "defaults.extra is not"),
        ("schemaVersion = 1\n[defaults.compileLimits]\nmemoryBytes = 1\nwallTimeMs = 1\n"
         "cpuTimeMs = 1\n[languages]\n", "defines no language"),
        ("schemaVersion = [", "languages.toml"),
    ],
)
def test_malformed_registry_is_an_internal_error(text: str, problem: str) -> None:
    with pytest.raises(InternalError) as info:
        parse_registry(text)
    assert problem in info.value.message
    assert info.value.code == "INTERNAL_ERROR"


def test_placeholder_set_is_closed() -> None:
    assert frozenset({"dir", "src", "out", "main"}) == PLACEHOLDERS


# --- on the real tree --------------------------------------------------------------------------

TREE = Path(os.environ.get("SANDBOXD_ROOTFS", "/var/lib/sandboxd/rootfs/default"))

# A bare room like bench/languages_bare.sh's: user namespace, read-only tree, tmpfs /tmp /root
# /home, the test's directory on /workspace, no network, hostname "sandbox".
_ROOM = r"""
set -e; T=$1; W=$2; shift 2
mount --bind "$T" "$T"; mount -o remount,bind,ro "$T"
for d in tmp root home; do mount -t tmpfs -o size=1g,mode=1777 tmpfs "$T/$d"; done
mount --bind "$W" "$T/workspace"
mount -t proc proc "$T/proc"
mount --rbind /dev "$T/dev"
hostname sandbox
exec chroot "$T" "$@"
"""


def _room(work: Path, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--net",
           "--uts", "--ipc", "--", "/bin/bash", "-c", _ROOM, "_", str(TREE), str(work),
           "/usr/bin/env", "-i", "--chdir=/workspace",
           *[f"{k}={v}" for k, v in env.items()], *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)


@pytest.mark.rootfs
@pytest.mark.parametrize("lang_id", IDS)
def test_example_runs_on_the_tree(registry: Registry, tmp_path: Path, lang_id: str) -> None:
    if not (TREE / "etc/sandboxd/manifest.json").is_file():
        skip_unless_ci(f"no runtime tree at {TREE} (rootfs/build.sh)")
    if shutil.which("unshare") is None:
        skip_unless_ci("needs unshare(1)")
    lang = registry.resolve(lang_id)
    tmp_path.chmod(0o777)
    (tmp_path / lang.source_file).write_text(lang.example)
    env = lang.env_for("/workspace")
    comp = lang.compile_argv("/workspace")
    if comp is not None:
        res = _room(tmp_path, comp, env)
        if res.returncode != 0 and "unshare" in res.stderr and not res.stdout:
            pytest.skip(f"cannot make a user namespace here: {res.stderr.strip()}")
        assert res.returncode == 0, res.stderr
    res = _room(tmp_path, lang.run_argv("/workspace"), env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == lang.expected_example_output


@pytest.mark.parametrize(("code", "source", "main"), [
    ("public class Main { public static void main(String[] a) {} }", "Main.java", "Main"),
    ("public class Solution { public static void main(String[] a) {} }", "Solution.java",
     "Solution"),
    ("class A {}\nclass B { static public void main(String[] a) {} }", "Main.java", "B"),
    ("/* public class Fake */ public final class Real {\n"
     "  public static void main(String[] args) { String s = \"class Nope\"; } }",
     "Real.java", "Real"),
    ("public record Point(int x) {}\nclass Go { public static void main(String... a) {} }",
     "Point.java", "Go"),
    ("class NoMain {}", "Main.java", "Main"),
])
def test_java_entry_point_from_the_source(code: str, source: str, main: str) -> None:
    java = load_registry().resolve("java").for_source(code)
    assert (java.source_file, java.main_class) == (source, main)
    assert java.run_argv("/d")[-1] == main
    assert java.compile_argv("/d")[-1] == f"/d/{source}"


def test_scala_entry_point_from_the_source() -> None:
    scala = load_registry().resolve("scala")
    assert scala.for_source("object Solution extends App { }").main_class == "Solution"
    assert scala.for_source("object H\nobject M { def main(a: Array[String]) = () }"
                            ).main_class == "M"
    assert scala.for_source("val x = 1").main_class == "Main"
