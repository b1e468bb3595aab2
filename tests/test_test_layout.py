"""Test files have unique names: pytest's default (prepend) import mode imports each by its basename,
so two ``test_x.py`` in different folders make collection fail on a clean checkout."""

from collections import Counter
from pathlib import Path


def test_test_module_names_are_unique():
    names = Counter(p.name for p in Path(__file__).resolve().parent.rglob("test_*.py"))
    assert not [n for n, count in names.items() if count > 1]
