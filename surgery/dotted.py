"""Dotted names (``blocks.3.ffn``, ``blocks.3.ffn.0.weight``) matched against patterns.

One pattern language serves every place that names modules or state_dict keys by pattern
(``TracePolicy.extra_leaves``, ``Rule.weight_prefixes``): a ``*`` part stands for any one
dotted name part, every other part is literal.
"""
from __future__ import annotations

import re
from functools import lru_cache

#: A pattern part that stands for any one dotted name part.
WILDCARD = "*"


@lru_cache(maxsize=512)
def dotted_regex(pattern: str) -> "re.Pattern[str]":
    """``pattern`` as a regular expression: ``*`` parts match one name part, the rest literally."""
    return re.compile(r"\.".join("[^.]+" if part == WILDCARD else re.escape(part) for part in pattern.split(".")))


def names(name: str, pattern: str) -> bool:
    """Whether ``pattern`` names ``name`` whole (``blocks.*.cross_attn`` names ``blocks.2.cross_attn``)."""
    return name == pattern or (WILDCARD in pattern and dotted_regex(pattern).fullmatch(name) is not None)


def starts_with(name: str, prefix: str) -> bool:
    """Whether ``name`` begins with ``prefix`` (``blocks.*.ffn_adapter.`` begins ``blocks.3.ffn_adapter.up.weight``);
    the prefix's last part may be a partial name, as with ``str.startswith``."""
    return name.startswith(prefix) if WILDCARD not in prefix else dotted_regex(prefix).match(name) is not None
