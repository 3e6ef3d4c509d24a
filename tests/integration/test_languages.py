"""runCode in all 13 languages on the built runtime tree: hello world, stdin transformed, a
non-zero exit, a compile error (CE) for each compiled language, the compile cache, and errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import skip_unless_ci

from sandboxd import errors

pytestmark = [pytest.mark.integration, pytest.mark.rootfs]

ROOTFS = os.environ.get("SANDBOXD_TEST_LANG_ROOTFS", "/var/lib/sandboxd/rootfs/default")

# Each program reads one line from stdin and prints it upper-cased; EXIT programs exit with 3.
UPPER = {
    "javascript": "const l=require('fs').readFileSync(0,'utf8').trim();console.log(l.toUpperCase());",
    "typescript": "const l: string = require('fs').readFileSync(0, 'utf8').trim();\n"
                  "console.log(l.toUpperCase());",
    "python": "print(input().upper())",
    "php": "<?php echo strtoupper(trim(fgets(STDIN))), \"\\n\";",
    "ruby": "puts gets.chomp.upcase",
    "java": "import java.util.Scanner;\npublic class Main { public static void main(String[] a) {"
            " System.out.println(new Scanner(System.in).nextLine().toUpperCase()); } }",
    "cpp": "#include <iostream>\n#include <string>\n#include <algorithm>\nint main(){std::string s;"
           "std::getline(std::cin,s);std::transform(s.begin(),s.end(),s.begin(),::toupper);"
           "std::cout<<s<<std::endl;}",
    "c": "#include <stdio.h>\n#include <ctype.h>\nint main(){int c;while((c=getchar())!=EOF&&c!='\\n')"
         "putchar(toupper(c));putchar('\\n');return 0;}",
    "rust": "use std::io::Read;\nfn main(){let mut s=String::new();"
            "std::io::stdin().read_to_string(&mut s).unwrap();println!(\"{}\", s.trim().to_uppercase());}",
    "go": "package main\nimport (\"bufio\";\"fmt\";\"os\";\"strings\")\nfunc main(){r:=bufio.NewReader(os.Stdin);"
          "l,_:=r.ReadString('\\n');fmt.Println(strings.ToUpper(strings.TrimSpace(l)))}",
    "swift": "let l = readLine()!\nprint(l.uppercased())",
    "kotlin": "fun main() { println(readLine()!!.toUpperCase()) }",
    "scala": "object Main { def main(a: Array[String]): Unit = "
             "println(scala.io.StdIn.readLine().toUpperCase) }",
}
EXIT3 = {
    "javascript": "process.exit(3)", "typescript": "process.exit(3);", "python": "import sys; sys.exit(3)",
    "php": "<?php exit(3);", "ruby": "exit 3",
    "java": "public class Main { public static void main(String[] a) { System.exit(3); } }",
    "cpp": "int main(){return 3;}", "c": "int main(void){return 3;}", "rust": "fn main(){std::process::exit(3);}",
    "go": "package main\nimport \"os\"\nfunc main(){os.Exit(3)}", "swift": "import Foundation\nexit(3)",
    "kotlin": "import kotlin.system.exitProcess\nfun main() { exitProcess(3) }",
    "scala": "object Main { def main(a: Array[String]): Unit = sys.exit(3) }",
}
BROKEN = {"typescript": "const x: number = 'not a number';", "java": "public class Main { int }",
          "cpp": "int main() { return undefined_thing; }", "c": "int main(void) { return nope; }",
          "rust": "fn main() { let x: u32 = \"s\"; }", "go": "package main\nfunc main() { x := }",
          "swift": "let x: Int = \"s\"", "kotlin": "fun main() { val x: Int = \"s\" }",
          "scala": "object Main { def main(a: Array[String]): Unit = { val x: Int = \"s\" } }"}
LANGS = list(UPPER)


@pytest.fixture(scope="module")
def lang_daemon(test_user: Any) -> Iterator[Any]:
    if not os.path.isdir(os.path.join(ROOTFS, "usr")):
        skip_unless_ci(f"the runtime tree is not built at {ROOTFS} "
                       "(rootfs/build.sh or .ci/rootfs.sh)")
    from conftest import make_daemon

    d = make_daemon(test_user, rootfs=ROOTFS)
    d.start()
    yield d
    assert d.stop() == 0, d.log()
    assert d.leftovers() == []


@pytest.fixture(scope="module")
def lang_room(lang_daemon: Any) -> Iterator[Any]:
    with lang_daemon.client(timeout=600) as c:
        sb = c.sandbox("langs")
        sb.get({"limits": {"memoryBytes": 2 << 30, "pids": 512}})
        yield sb


def test_list_languages_reports_all_13_available(lang_daemon: Any) -> None:
    with lang_daemon.client() as c:
        langs = {x["id"]: x for x in c.list_languages()}
    assert set(langs) == set(LANGS)
    assert all(x["available"] and x["version"] for x in langs.values()), langs


@pytest.mark.parametrize("lang", LANGS)
def test_stdin_transformed(lang_room: Any, lang: str) -> None:
    res = lang_room.run_code(lang, UPPER[lang], stdin="hello sandbox\n")
    assert res["status"] == "OK", res
    assert res["stdout"] == "HELLO SANDBOX\n"


@pytest.mark.parametrize("lang", LANGS)
def test_nonzero_exit_is_re(lang_room: Any, lang: str) -> None:
    res = lang_room.run_code(lang, EXIT3[lang])
    assert (res["status"], res["exitCode"]) == ("RE", 3), res


@pytest.mark.parametrize("lang", list(BROKEN))
def test_compile_error_is_ce_with_the_compilers_output(lang_room: Any, lang: str) -> None:
    res = lang_room.run_code(lang, BROKEN[lang])
    assert res["status"] == "CE", res
    comp = res["compile"]
    assert comp["exitCode"] != 0 and (comp["stderr"] or comp["stdout"])


def test_examples_print_hello_in_every_language(lang_room: Any) -> None:
    results = lang_room.run_example_code()
    assert {r["language"] for r in results} == set(LANGS)
    bad = [(r["language"], r.get("status"), r.get("stdout"), r.get("compile")) for r in results
           if not r["success"]]
    assert not bad


def test_second_run_skips_the_compiler(lang_room: Any) -> None:
    code = "#include <stdio.h>\nint main(void){puts(\"cache me\");return 0;}"
    first = lang_room.run_code("c", code)
    second = lang_room.run_code("c", code)
    assert first["compile"] is not None and first["cached"] is False
    assert second["compile"] is None and second["cached"] is True
    assert second["stdout"] == first["stdout"] == "cache me\n"


def test_multi_file_program_and_args(lang_room: Any) -> None:
    res = lang_room.run_code(
        "python", "import helper, sys; print(helper.twice(sys.argv[1]))",
        files={"helper.py": "def twice(s):\n    return s * 2\n"}, args=["ab"])
    assert res["stdout"] == "abab\n", res


def test_run_limits_apply_to_the_program(lang_room: Any) -> None:
    res = lang_room.run_code("python", "while True: pass", limits={"cpuTimeMs": 300})
    assert res["status"] == "TO" and res["limitExceeded"] == "cpu"


def test_unknown_language_lists_the_supported_ids(lang_room: Any) -> None:
    with pytest.raises(errors.UnsupportedLanguage) as exc:
        lang_room.run_code("cobol", "DISPLAY 'hi'.")
    assert set(exc.value.context["supported"]) == set(LANGS)


@pytest.mark.parametrize("alias,lang", [("js", "javascript"), ("ts", "typescript"),
                                        ("py", "python"), ("c++", "cpp"), ("rs", "rust"),
                                        ("golang", "go"), ("kt", "kotlin")])
def test_aliases(lang_room: Any, alias: str, lang: str) -> None:
    assert lang_room.run_code(alias, EXIT3[lang])["language"] == lang


def test_compiled_languages_work_without_cgroups(test_user: Any, tmp_path: Any) -> None:
    """Regression: the registry's default compile limits (cpuTimeMs, memoryBytes) were treated
    as requests, so on a host without cgroups every compiled language failed LIMIT_UNAVAILABLE.
    Defaults apply where enforceable; a caller's explicit limit still fails closed."""
    if not os.path.isdir(os.path.join(ROOTFS, "usr")):
        skip_unless_ci(f"the runtime tree is not built at {ROOTFS}")
    from conftest import make_daemon

    d = make_daemon(test_user, rootfs=ROOTFS)
    conf = os.path.join(os.path.dirname(d.state_dir), "sandboxd.toml")
    with open(conf, "w") as f:
        f.write('cgroup_backend = "disabled"\n')
    os.chmod(conf, 0o644)
    d.extra_args = ["--config", conf]
    d.start()
    try:
        with d.client(timeout=300) as c:
            sb = c.sandbox("nocg")
            res = sb.run_code("c", EXIT3["c"])
            assert (res["status"], res["exitCode"]) == ("RE", 3), res
            with pytest.raises(errors.LimitUnavailable):
                sb.run_code("c", EXIT3["c"] + "\n", compile_limits={"cpuTimeMs": 1000})
    finally:
        assert d.stop() == 0, d.log()


# --- entry points as judges accept them (issue 10, judge fidelity 2 and 4) ---------------------

JAVA_ENTRY = {
    "public class Solution": 'import java.util.*;\npublic class Solution {\n  public static void '
    'main(String[] a) { System.out.println("sol " + new Scanner(System.in).nextLine()); }\n}\n',
    "no public class": 'class Helper { static String f() { return "helped"; } }\nclass Prog {\n'
    '  public static void main(String[] a) { System.out.println(Helper.f()); }\n}\n',
    "public helper, main elsewhere": '// class Fake { static void main() {} }\npublic class Api {'
    ' static int one() { return 1; } }\nclass Runner { public static void main(String... a) {\n'
    '  System.out.println("one=" + Api.one() + " \\"class Nope\\""); } }\n',
}
JAVA_OUT = {"public class Solution": "sol x\n", "no public class": "helped\n",
            "public helper, main elsewhere": 'one=1 "class Nope"\n'}


@pytest.mark.parametrize("case", sorted(JAVA_ENTRY))
def test_java_runs_whatever_the_class_is_called(lang_room: Any, case: str) -> None:
    res = lang_room.run_code("java", JAVA_ENTRY[case], stdin="x\n")
    assert (res["status"], res["stdout"]) == ("OK", JAVA_OUT[case]), res
    assert lang_room.run_code("java", JAVA_ENTRY[case], stdin="x\n")["cached"] is True


def test_scala_object_need_not_be_main(lang_room: Any) -> None:
    res = lang_room.run_code("scala", 'object Solution extends App { println("scala ok") }\n')
    assert (res["status"], res["stdout"]) == ("OK", "scala ok\n"), res


def test_go_package_other_than_main_is_a_compile_error(lang_room: Any) -> None:
    res = lang_room.run_code("go", "package solution\n\nfunc F() int { return 1 }\n")
    assert res["status"] == "CE", res
    assert "main package" in res["compile"]["stderr"]


def test_go_compiles_do_not_share_a_build_cache_room_code_can_touch(lang_room: Any) -> None:
    """go-cacheprog reads GOCACHE before the tree's prebuilt std: a room-wide GOCACHE let room
    code shadow or break what later compiles link. Each build has its own, sealed with it."""
    r = lang_room.exec("for d in /tmp/.cache/go-build /tmp/go-build; do mkdir -p $d && "
                       "for i in 0 1 2 3 4 5 6 7 8 9 a b c d e f; do mkdir -p $d/$i$i && "
                       "echo junk > $d/$i$i/junk-a; done; chmod -R 000 $d; done; echo ok")
    assert r.stdout == "ok\n"
    res = lang_room.run_code("go", 'package main\n\nimport "fmt"\n\nfunc main() '
                                   '{ fmt.Println("go unshaken") }\n')
    assert (res["status"], res["stdout"]) == ("OK", "go unshaken\n"), res
