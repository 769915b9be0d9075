"""LoRA targets that the model never calls: a check only a graph tool can make.

PEFT wraps whatever module a name points at, whether or not forward uses it. A model whose
projections were fused after loading (``to_qkv`` replacing ``q``/``k``/``v``) keeps the old
modules, so a LoRA on them is silently a no-op. The traced graphs know every module call:
``call_module`` nodes, plus the calls observed inside opaque leaves while tracing.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch.nn as nn


def called_modules(model: nn.Module) -> set[str]:
    """Qualified names of every module some specialised graph of ``model`` calls."""
    state = model.__dict__.get("_surgery")
    if state is None:
        raise TypeError("not a rewritten model: call surgery.apply first")
    called: set[str] = set()
    for spec in state.specialisations.values():
        called.update(str(n.target) for n in spec.graph.nodes if n.op == "call_module")
        for leaf, inner in spec.leaf_calls.items():
            called.add(leaf)
            called.update(inner)
    return called


def _strip_peft(name: str) -> str:
    # After PEFT injection the called module is `<target>.base_layer`; report the target.
    return re.sub(r"\.base_layer$", "", name)


def uncalled_targets(model: nn.Module, targets: Iterable[str] | str) -> list[str]:
    """The Linear modules selected by ``targets`` (names or one regex) that are never called.

    ``targets`` follows PEFT's ``target_modules``: a list of names matched as exact names
    or dotted suffixes, or a single string used as a full-match regular expression.
    """
    called = {_strip_peft(n) for n in called_modules(model)}
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(targets, str):
        chosen = [n for n in names if re.fullmatch(targets, n)]
    else:
        wanted = list(targets)
        chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]
    return sorted(n for n in chosen if n not in called)
