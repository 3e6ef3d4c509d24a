"""bench/mutants.py stays applicable: every mutant's text is in its module exactly once.

A refactor that moves a validator (issue 24's A01-A03 and E01 moved from api/files.py to
roomfiles.py) must move its mutant too, or the mutation run stops at that mutant. This lives
apart from test_validation.py, which is what the mutation run executes under each mutant (there,
a mutant's text is of course missing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

TOP = Path(__file__).resolve().parents[2]


def _mutants() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_mutants", TOP / "bench" / "mutants.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MUTANTS: dict[str, tuple[str, str, str, str]] = _mutants().MUTANTS


@pytest.mark.parametrize("mid", sorted(MUTANTS))
def test_mutant_text_is_in_its_module_once(mid: str) -> None:
    rel, old, new, _what = MUTANTS[mid]
    assert old != new
    assert (TOP / rel).read_text().count(old) == 1, f"{mid}: {old!r} not once in {rel}"
