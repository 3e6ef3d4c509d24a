"""The language registry: ``languages.toml`` (data) loaded into frozen, typed records.

    load_registry(path=None) -> Registry   parse and validate (the packaged file by default)
    Registry.resolve("c++") -> Language    id or alias, case-insensitive; else UnsupportedLanguage
    Language.compile_argv(dir), run_argv(dir), version_argv    argv with placeholders filled in

Placeholders (the only ones allowed, checked at load time):

    {dir}   the run's working directory inside the room (writable; the source file is written here)
    {src}   {dir}/<sourceFile>
    {out}   {dir}/<outputName>: the compiled artifact (a binary, or a jar for Kotlin)
    {main}  the class (JVM) the program starts from: with ``entryPoint`` set, found in the
            submission (``Language.for_source``), else ``mainClass`` (default "Main")

The file is packaged data, not user input: a malformed registry is a bug in sandboxd, so every
problem raises :class:`~sandboxd.errors.InternalError` naming the language and the key.
Nothing here touches the runtime tree; whether a toolchain is installed is the manifest's business
(``rootfs/build.sh`` writes ``/etc/sandboxd/manifest.json``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sandboxd.errors import InternalError, UnsupportedLanguage

__all__ = ["Language", "Limits", "Registry", "load_registry"]

PLACEHOLDERS = frozenset({"dir", "src", "out", "main"})

# --- entry points of JVM submissions -------------------------------------------------------------
# Judges accept `public class Solution` (or no public class) where we used to insist on Main:
# javac wants a public class in a file of its name, and `java` wants the class with main().
# A lexical reading is enough for the submissions judges see; comments and string literals are
# blanked first so that a "class" inside them does not count.
_JAVA_NOISE = re.compile(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'',
                         re.S)
_IDENT = r"[A-Za-z_$][\w$]*"
_JAVA_PUBLIC = re.compile(
    rf"\bpublic\s+(?:(?:final|abstract|strictfp|sealed|non-sealed)\s+)*"
    rf"(?:class|interface|enum|record)\s+({_IDENT})")
_JAVA_TYPE = re.compile(rf"\b(?:class|interface|enum|record)\s+({_IDENT})")
_JAVA_MAIN = re.compile(r"\bvoid\s+main\s*\(\s*(?:final\s+)?String\b")
_SCALA_OBJECT = re.compile(rf"\bobject\s+({_IDENT})")
_SCALA_MAIN = re.compile(r"\bdef\s+main\s*\(|\bextends\s+App\b")


def _entry_of(kinds: tuple[re.Pattern[str], re.Pattern[str]], code: str) -> str | None:
    """The name of the last type declared before the first main() (or ``extends App``)."""
    types, main = kinds
    clean = _JAVA_NOISE.sub(" ", code)
    at = main.search(clean)
    if at is None:
        return None
    names = [m.group(1) for m in types.finditer(clean, 0, at.start())]
    return names[-1] if names else None

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_ID = re.compile(r"^[a-z][a-z0-9+#-]{0,31}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one step (a compile); enforced by the room, not here."""

    memory_bytes: int
    wall_time_ms: int
    cpu_time_ms: int


@dataclass(frozen=True, slots=True)
class Language:
    id: str
    name: str
    aliases: tuple[str, ...]
    extension: str
    source_file: str
    output_name: str
    compile: tuple[str, ...] | None
    run: tuple[str, ...]
    version: tuple[str, ...]
    env: Mapping[str, str] = field(hash=False)  # a read-only view; unhashable
    compile_limits: Limits | None
    example: str
    main_class: str = "Main"
    entry_point: str | None = None  # "java" or "scala": find {main} in the submission

    def for_source(self, code: str) -> Language:
        """This language as ``code`` needs it: a Java submission whose public class is
        Solution is written as Solution.java, and its main() class is the one ``java`` starts."""
        if self.entry_point == "java":
            public = _JAVA_PUBLIC.search(_JAVA_NOISE.sub(" ", code))
            main = _entry_of((_JAVA_TYPE, _JAVA_MAIN), code) or (
                public.group(1) if public else None)
            source = f"{public.group(1)}.{self.extension}" if public else self.source_file
            return replace(self, source_file=source, main_class=main or self.main_class)
        if self.entry_point == "scala":
            main = _entry_of((_SCALA_OBJECT, _SCALA_MAIN), code)
            return replace(self, main_class=main) if main else self
        return self

    @property
    def compiled(self) -> bool:
        return self.compile is not None

    @property
    def expected_example_output(self) -> str:
        return f"Hello from {self.name}!\n"

    def _fill(self, argv: tuple[str, ...], directory: str) -> list[str]:
        directory = directory.rstrip("/") or "/"
        base = "" if directory == "/" else directory
        values = {
            "dir": directory,
            "src": f"{base}/{self.source_file}",
            "out": f"{base}/{self.output_name}",
            "main": self.main_class,
        }
        return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in argv]

    def env_for(self, directory: str) -> dict[str, str]:
        """The environment of a build or run in ``directory`` (values may use placeholders)."""
        return dict(zip(self.env, self._fill(tuple(self.env.values()), directory), strict=True))

    def compile_argv(self, directory: str) -> list[str] | None:
        """The compile command for sources in ``directory``; None for interpreted languages."""
        return None if self.compile is None else self._fill(self.compile, directory)

    def run_argv(self, directory: str) -> list[str]:
        return self._fill(self.run, directory)

    @property
    def version_argv(self) -> list[str]:
        return list(self.version)


@dataclass(frozen=True, slots=True, eq=False)
class Registry:
    languages: Mapping[str, Language]
    _by_name: Mapping[str, Language]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self.languages)

    def resolve(self, name_or_alias: str) -> Language:
        lang = self._by_name.get(name_or_alias.strip().lower())
        if lang is None:
            supported = list(self.languages)
            raise UnsupportedLanguage(
                f"unsupported language {name_or_alias!r}; supported: {', '.join(supported)}",
                language=name_or_alias,
                supported=supported,
            )
        return lang

    def __iter__(self) -> Iterator[Language]:
        return iter(self.languages.values())

    def __len__(self) -> int:
        return len(self.languages)

    def __contains__(self, name_or_alias: object) -> bool:
        return isinstance(name_or_alias, str) and (
            name_or_alias.strip().lower() in self._by_name
        )


# --- loading and validation --------------------------------------------------------------------


class _Table:
    """One TOML table read strictly: typed getters, and unknown keys are an error."""

    def __init__(self, where: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise InternalError(f"language registry: {where} must be a table", key=where)
        self.where = where
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def _get(self, key: str, required: bool) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                self.fail(key, "is missing")
            return None
        return self.data[key]

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, problem: str) -> None:
        raise InternalError(f"language registry: {self.path(key)} {problem}", key=self.path(key))

    def string(self, key: str, required: bool = True) -> str | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(key, "must be a non-empty string")
        return str(value)

    def req_string(self, key: str) -> str:
        value = self.string(key)
        assert value is not None
        return value

    def argv(self, key: str, required: bool = True) -> tuple[str, ...] | None:
        value = self._get(key, required)
        if value is None:
            return None
        if (not isinstance(value, list) or not value
                or not all(isinstance(a, str) and a for a in value)):
            self.fail(key, "must be a non-empty list of non-empty strings")
        for arg in value:
            for name in _PLACEHOLDER.findall(arg):
                if name not in PLACEHOLDERS:
                    self.fail(key, f"uses unknown placeholder {{{name}}}")
        return tuple(value)

    def strings(self, key: str) -> tuple[str, ...]:
        value = self._get(key, False)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(a, str) and a for a in value):
            self.fail(key, "must be a list of non-empty strings")
        return tuple(value)

    def env(self, key: str) -> dict[str, str]:
        value = self._get(key, False)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and k and "=" not in k and isinstance(v, str)
            for k, v in value.items()
        ):
            self.fail(key, "must be a table of string values")
        return dict(value)

    def table(self, key: str, required: bool = False) -> _Table | None:
        value = self._get(key, required)
        return None if value is None else _Table(self.path(key), value)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            self.fail(unknown[0], "is not a known key")


def _limits(table: _Table | None, base: Limits | None = None) -> Limits | None:
    if table is None:
        return base
    values: dict[str, int] = {}
    for key, attr in (("memoryBytes", "memory_bytes"), ("wallTimeMs", "wall_time_ms"),
                      ("cpuTimeMs", "cpu_time_ms")):
        raw = table._get(key, base is None)
        if raw is None:
            assert base is not None
            raw = getattr(base, attr)
        if not isinstance(raw, int) or isinstance(raw, bool) or raw <= 0:
            table.fail(key, "must be a positive integer")
        values[attr] = raw
    table.done()
    return Limits(**values)


def _language(lang_id: str, table: _Table, env: Mapping[str, str],
              limits: Limits | None) -> Language:
    if not _ID.match(lang_id):
        table.fail("id", f"{lang_id!r} is not a valid language id")
    extension = table.req_string("extension")
    source_file = table.req_string("sourceFile")
    output_name = table.string("outputName", required=False) or "main"
    for key, value in (("sourceFile", source_file), ("outputName", output_name)):
        if not _FILE_NAME.match(value) or value in {".", ".."}:
            table.fail(key, f"{value!r} is not a plain file name")
    if not source_file.endswith("." + extension):
        table.fail("sourceFile", f"must end with .{extension}")
    compile_cmd = table.argv("compile", required=False)
    compile_table = table.table("compileLimits")
    if compile_cmd is None and compile_table is not None:
        table.fail("compileLimits", "is set but the language has no compile command")
    aliases = tuple(a.lower() for a in table.strings("aliases"))
    lang = Language(
        id=lang_id,
        name=table.req_string("name"),
        aliases=aliases,
        extension=extension,
        source_file=source_file,
        output_name=output_name,
        compile=compile_cmd,
        run=table.argv("run") or (),
        version=table.argv("version") or (),
        env=MappingProxyType({**env, **table.env("env")}),
        compile_limits=_limits(compile_table, limits) if compile_cmd is not None else None,
        example=table.req_string("example"),
        main_class=table.string("mainClass", required=False) or "Main",
        entry_point=table.string("entryPoint", required=False),
    )
    if lang.entry_point not in (None, "java", "scala"):
        table.fail("entryPoint", "must be java or scala")
    table.done()
    return lang


def parse_registry(text: str, where: str = "languages.toml") -> Registry:
    """Parse registry TOML text (``load_registry`` reads the file and calls this)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InternalError(f"language registry {where}: {err}", where=where) from err
    top = _Table("", data)
    schema = top._get("schemaVersion", True)
    if schema != 1:
        top.fail("schemaVersion", f"is {schema!r}; this sandboxd reads 1")
    defaults = top.table("defaults") or _Table("defaults", {})
    env = defaults.env("env")
    limits = _limits(defaults.table("compileLimits", required=True))
    defaults.done()
    langs_table = top.table("languages", required=True)
    assert langs_table is not None
    top.done()

    languages: dict[str, Language] = {}
    by_name: dict[str, Language] = {}
    for lang_id in langs_table.data:
        lang = _language(lang_id, _Table(f"languages.{lang_id}", langs_table.data[lang_id]),
                         env, limits)
        languages[lang_id] = lang
        for name in (lang_id, *lang.aliases):
            other = by_name.get(name)
            if other is not None:
                raise InternalError(
                    f"language registry: {name!r} names both {other.id} and {lang_id}",
                    name=name,
                )
            by_name[name] = lang
    langs_table.used.update(langs_table.data)
    if not languages:
        raise InternalError(f"language registry {where} defines no language", where=where)
    return Registry(languages=MappingProxyType(languages), _by_name=MappingProxyType(by_name))


def load_registry(path: Path | None = None) -> Registry:
    """Load ``languages.toml`` (the one packaged next to this module unless ``path`` is given)."""
    source: Traversable
    if path is None:
        source = resources.files("sandboxd.coderun").joinpath("languages.toml")
        where = "sandboxd/coderun/languages.toml"
    else:
        source = path
        where = str(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as err:
        raise InternalError(f"cannot read language registry {where}: {err}", where=where) from err
    return parse_registry(text, where)
