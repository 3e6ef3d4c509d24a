"""runCode's compile cache cannot be changed or planted by room code (issue 10, M2).

The cache lived in the room's /tmp: room code overwrote the cached sources or the ``.compiled``
marker, and the next submission of the same source ran the attacker's code with ``cached:
true`` — on an interview platform, the grader's reference solution running the candidate's
binary. Now the cache base is a mount point owned by an id no payload runs as, and a compiled
directory is sealed (chowned to that id, read-only) before it is ever reused.
"""

from __future__ import annotations

from typing import Any

import pytest
import sec_helpers as h

sec_user = h.sec_user
client_users = h.client_users
sec_daemon = h.sec_daemon
sec_client = h.sec_client
rooms = h.rooms

pytestmark = [pytest.mark.security, pytest.mark.integration, pytest.mark.subordinate_ids]

PROGRAMS = {
    "python": 'print("good")\n',
    "c": '#include <stdio.h>\nint main(void) { puts("good"); return 0; }\n',
}
TAMPER = r"""
cd /tmp/.sandboxd || exit 9
for d in */; do
  for f in "$d"* "$d".compiled; do
    printf '#!/bin/sh\necho evil\n' > "$f" 2>/dev/null && echo "WROTE $f"
    chmod 777 "$f" 2>/dev/null && echo "CHMOD $f"
  done
  rm -rf "$d" 2>/dev/null; [ -e "$d" ] || echo "REMOVED $d"
  mv "$d" /tmp/moved 2>/dev/null && echo "MOVED $d"
done
mv /tmp/.sandboxd /tmp/.old 2>/dev/null && echo "MOVED base"
rm -rf /tmp/.sandboxd 2>/dev/null; [ -d /tmp/.sandboxd ] || echo "REMOVED base"
mkdir /tmp/.sandboxd/python-planted 2>/dev/null && echo "PLANTED"
ls -la /tmp/.sandboxd
"""


@pytest.mark.parametrize("language", sorted(PROGRAMS))
@pytest.mark.parametrize("user", ["root", "sandbox"])
def test_room_code_cannot_change_the_compile_cache(rooms: Any, language: str,
                                                   user: str) -> None:
    (sb,) = rooms(1)
    first = sb.run_code(language, PROGRAMS[language])
    assert first["stdout"] == "good\n" and first["cached"] is False, first
    r = sb.exec(TAMPER, user=user)
    assert r.exit_code != 9
    for word in ("WROTE", "CHMOD", "REMOVED", "MOVED", "PLANTED"):
        assert word not in r.stdout, r.stdout
    again = sb.run_code(language, PROGRAMS[language])
    assert again["stdout"] == "good\n", again
    assert again["cached"] is True, "the sealed compile should still be reused"


def test_a_compile_the_room_tampered_with_before_sealing_is_not_reused(rooms: Any) -> None:
    """A failed compile leaves an unsealed directory; the next runCode starts it afresh."""
    (sb,) = rooms(1)
    bad = sb.run_code("c", "int main(void) { return undefined_symbol; }\n")
    assert bad["status"] == "CE"
    fixed = "#include <stdio.h>\nint main(void) { puts(\"fixed\"); return 0; }\n"
    assert sb.run_code("c", fixed)["stdout"] == "fixed\n"
    ok = sb.run_code("c", fixed)
    assert (ok["stdout"], ok["cached"]) == ("fixed\n", True)
