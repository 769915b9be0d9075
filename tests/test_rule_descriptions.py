"""``surgery rules`` describes each built-in rule in one real line: what it does, in plain text."""
from __future__ import annotations

import inspect
import re

import pytest

from rules import RULES
from surgery.cli.main import main

BUILT_IN = ["vace", "ffn-adapter", "attention-swap"]


def _first_line(name: str) -> str:
    return inspect.getdoc(RULES[name]).splitlines()[0]


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_built_in_rule_says_what_it_does_in_plain_text(name):
    line = _first_line(name)
    assert not re.fullmatch(r"The [\w -]+ rule\.", line), line  # a name, not a description
    assert "``" not in line and ":class:" not in line and ":func:" not in line  # no reST in a table cell
    assert line.endswith(".") and 40 <= len(line) <= 110


def test_the_catalogue_shows_those_lines(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # no wrapping inside the description cells
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    assert "The VACE rule." not in out
    for name in BUILT_IN:
        assert _first_line(name) in out
