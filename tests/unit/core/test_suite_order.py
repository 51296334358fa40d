"""The suite's own scheduling: every module `make test` hands out first exists (a renamed
module would silently lose its place and could be taken last)."""

from __future__ import annotations

from conftest import LONGEST_FIRST, REPO


def test_every_module_named_to_go_first_exists_once():
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    missing = [name for name in LONGEST_FIRST if not (REPO / "tests" / name).is_file()]
    assert not missing, f"tests/conftest.py LONGEST_FIRST names modules that are not there: {missing}"
