"""The engine names no rule, no model family and no pipeline (#12): ``surgery/`` source, comments
included, says ``vace``, ``hint``, ``Wan`` or a built-in pipeline's name only where a docstring
gives an example.

A line may name one of them only when it lies inside a docstring and either the name comes
after ``e.g.`` on that line, or the line is a doctest line (``>>>``/``...``). One more
exception: the string literal ``"hint_index"``, the field name of schema-1 reports and of
matches pickled before the rename, which surgery still reads (docs/report-schema.md).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from examples import PIPELINES

ROOT = Path(__file__).resolve().parents[1] / "surgery"
#: The legacy field name that old files carry, allowed as that exact string literal only.
LEGACY = '"hint_index"'


def _forbidden() -> re.Pattern[str]:
    pipelines = sorted({name.lower() for name in PIPELINES} | {"longlive", "krea", "memflow", "streamdiffusion",
                                                              "reward_forcing", "self_forcing"})
    # A pipeline name is spelled with '_' or '-' (reward_forcing, reward-forcing).
    names = [re.escape(n).replace("_", "[_-]") for n in pipelines]
    return re.compile("|".join([
        r"(?i:vace)",                       # any spelling, inside identifiers too (load_vace_weights)
        r"(?i:hint)",                       # hint, hints, hint_index, compute_hints
        r"(?<![A-Za-z])wan(?![a-z])",       # wan, wan2.1, wan_block, not 'want' or 'swan'
        r"(?<![A-Za-z])WAN(?![A-Z])",       # WAN, WAN_PROFILE
        r"Wan(?![a-z])",                    # Wan, Wan2.1, CausalWanModel, WanVACE
        *[rf"(?i:{n})" for n in names],
    ]))


FORBIDDEN = _forbidden()


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def offending_lines(source: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of every line of ``source`` that names a forbidden word outside an example."""
    docstrings = _docstring_lines(ast.parse(source))
    found = []
    for number, line in enumerate(source.splitlines(), 1):
        text = line.replace(LEGACY, "")
        matches = list(FORBIDDEN.finditer(text))
        if not matches:
            continue
        if number in docstrings:
            stripped = text.lstrip()
            if stripped.startswith((">>>", "...")):
                continue
            example = text.find("e.g.")
            if example >= 0 and all(m.start() > example for m in matches):
                continue
        found.append((number, line.strip()))
    return found


def test_the_criterion_tells_examples_from_names():
    source = '''"""A module.

Run it on any model, e.g. a Wan transformer with VACE.
>>> from rules import vace
"""
WAN_BLOCKS = 3  # the hints
def f():
    """Counts the vace blocks."""
    return want + swan + "hint_index"
'''
    assert [n for n, _ in offending_lines(source)] == [6, 8]


def test_the_criterion_catches_pipeline_names_in_either_spelling():
    assert [n for n, _ in offending_lines("x = 'reward-forcing'\ny = LONGLIVE\nz = 'memflows'\n")] == [1, 2, 3]


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_surgery_source_names_no_rule_family_or_pipeline(path):
    found = offending_lines(path.read_text(encoding="utf-8"))
    assert not found, "\n".join(f"{path.relative_to(ROOT.parent)}:{n}: {line}" for n, line in found)
