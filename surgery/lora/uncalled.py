"""LoRA targets that the model never calls: a check only a graph tool can make.

PEFT wraps whatever module a name points at, whether or not forward uses it. A model whose
projections were fused after loading (``to_qkv`` replacing ``q``/``k``/``v``) keeps the old
modules, so a LoRA on them is silently a no-op. The traced graphs know every module call:
``call_module`` nodes, plus the calls observed inside opaque leaves while tracing.

The check works before and after LoRA injection: a PEFT-wrapped Linear counts under its
own name (the name a LoRA file or ``target_modules`` uses), and PEFT's internals
(``base_layer``, ``lora_A.<adapter>``, ``lora_B.<adapter>``) are never reported.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch.nn as nn

from surgery.lora.targets import _is_tuner_layer


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
    # A LoRA layer traced through (not as a leaf) shows its `<target>.base_layer`; report the target.
    return re.sub(r"\.base_layer$", "", name)


def linear_targets(model: nn.Module) -> list[str]:
    """Names a LoRA can target: every ``nn.Linear``, a PEFT-wrapped Linear under its own name.

    The Linears PEFT creates or moves (``<target>.base_layer``, ``<target>.lora_A.<adapter>``)
    are not listed: they are parts of the wrapped target, not targets of their own.
    """
    names: list[str] = []
    wrapper: str | None = None
    # named_modules is pre-order, so a wrapper's descendants directly follow it.
    for name, module in model.named_modules():
        if wrapper is not None and name.startswith(wrapper + "."):
            continue
        if _is_tuner_layer(module):
            wrapper = name
            if isinstance(module.get_base_layer(), nn.Linear):
                names.append(name)
        elif isinstance(module, nn.Linear):
            names.append(name)
    return names


def uncalled_linear(model: nn.Module) -> list[str]:
    """Every LoRA-targetable Linear of the rewritten ``model`` that no specialised graph calls."""
    called = {_strip_peft(n) for n in called_modules(model)}
    return sorted(n for n in linear_targets(model) if n not in called)


def uncalled_targets(model: nn.Module, targets: Iterable[str] | str) -> list[str]:
    """The Linear modules selected by ``targets`` (names or one regex) that are never called.

    ``targets`` follows PEFT's ``target_modules``: a list of names matched as exact names
    or dotted suffixes, or a single string used as a full-match regular expression.
    """
    uncalled = uncalled_linear(model)
    if isinstance(targets, str):
        return [n for n in uncalled if re.fullmatch(targets, n)]
    wanted = list(targets)
    return [n for n in uncalled if any(n == t or n.endswith("." + t) for t in wanted)]
