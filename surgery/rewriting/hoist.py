"""Hoisting a rule's inserted code above opaque calls it does not need.

An action runs at its site, so its code lands right before (or after) the unit it acts on.
Where an opaque call (a model's cache helper, a stateful leaf module) runs just before
that site, ``torch.compile`` breaks the graph at the opaque call, and the rule's code
becomes a compiled graph of its own between the break and the unit. Moving the code above
the opaque call joins it to the graph before the break, and changes no value, when all of
these hold (checked on the graph, node sets compared; if one fails, the code stays put):

1. **Independence**: no node of the rule's code reads, directly or through other nodes,
   a value computed at or after the opaque call (nor at a placeholder, nor inside a traced
   module call's body, whose nodes stay together for outlining).
2. **No shared values**: the opaque call is handed none of the values the rule's code
   reads, and the two share no value they were computed from: it could write any of them
   in place, and a view shares its base's storage (hence the closures over inputs). A
   helper is also handed its own module as ``self``: it wrote none of the parameters and
   buffers the rule's code reads (``get_attr``, a layer's weights) on the example call (the
   tracer records what it wrote: ``node.meta["writes_state"]``; a stateful leaf module may
   write any of its own); a helper that writes one only on other calls is beyond what the
   graph shows.
3. **No side effects of its own**: the rule's code holds no opaque or stateful call (a
   module that is not a built-in ``torch.nn`` layer, a cache helper), no in-place
   operation (even on a value it created, which could be a view of one it did not), no
   random operation and no training-mode dropout (either would change the random stream
   the opaque call sees).

Pure nodes between the code and the opaque call are crossed as well, so the code keeps its
order relative to everything it reads; it is placed right before the earliest opaque call
it is hoisted above, no further, so the graph otherwise keeps its traced order.
"""
from __future__ import annotations

import operator
from typing import Iterable, Sequence

import torch.fx as fx
import torch.nn as nn
from torch._library.utils import is_impure

from ..tracing.tracer import ModuleCall

_INPLACE_OPERATORS = frozenset({
    operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
    operator.ixor, operator.ilshift, operator.irshift,
})


def hoist_rule_code(graph: fx.Graph, calls: Sequence[ModuleCall], root: nn.Module) -> int:
    """Move each run of a rule's inserted nodes (``node.meta["surgery"]``) above the opaque
    calls right before it where that is safe (see the module docstring); returns the number
    of runs moved. ``calls`` are the trace's module calls, ``root`` the traced (twin) model."""
    owner = {node: call for call in calls for node in call.nodes}
    moved = 0
    for run in _rule_runs(graph):
        if not _side_effect_free(run, root) or _splits_a_call(run, owner):
            continue
        target = _earliest_crossable_opaque_call(run, owner, root)
        if target is not None:
            for node in run:
                target.prepend(node)
            moved += 1
    return moved


def _rule_runs(graph: fx.Graph) -> list[list[fx.Node]]:
    """Maximal stretches of consecutive nodes a rule inserted, in graph order."""
    runs: list[list[fx.Node]] = []
    current: list[fx.Node] = []
    for node in graph.nodes:
        if "surgery" in node.meta:
            current.append(node)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _opaque(node: fx.Node, root: nn.Module) -> bool:
    """Whether running ``node`` could change a value or state other than its own result."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return module.training and module.p > 0
        return not type(module).__module__.startswith("torch.nn.")  # a model's own leaf may write a cache
    if node.op == "call_method":
        return node.target.endswith("_") or "opaque_helper" in node.meta
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _INPLACE_OPERATORS or name.endswith("_") or "dropout" in name
                or is_impure(node.target, args=node.args, kwargs=node.kwargs))
    return False  # get_attr


def _side_effect_free(run: list[fx.Node], root: nn.Module) -> bool:
    """Condition 3: no node of the run writes anything or draws random numbers."""
    return not any(_opaque(node, root) for node in run)


def _splits_a_call(run: list[fx.Node], owner: dict[fx.Node, ModuleCall]) -> bool:
    """Whether a traced module call has nodes both inside and outside the run."""
    inside = set(run)
    calls = {id(owner[node]): owner[node] for node in run if node in owner}
    return any(not inside.issuperset(node for node in call.nodes if not node._erased) for call in calls.values())


def _closure(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """``nodes`` and every node they were computed from."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _earliest_crossable_opaque_call(run: list[fx.Node], owner: dict[fx.Node, ModuleCall],
                                    root: nn.Module) -> fx.Node | None:
    """Walking up from the run: the earliest opaque call it may be moved above (conditions 1
    and 2), crossing pure nodes it does not read; ``None`` when there is none."""
    inside = set(run)
    reads: set[fx.Node] | None = None  # computed once a node can be crossed (most runs follow a block's node)
    target = None
    node = run[0].prev
    while node.op not in ("root", "placeholder") and node not in owner:
        if reads is None:
            reads = _closure(value for member in run for value in member.all_input_nodes if value not in inside)
        if node in reads:
            break  # condition 1
        if _opaque(node, root):
            if _closure(node.all_input_nodes) & reads or _reads_written_state(run, node):
                break  # condition 2
            target = node
        node = node.prev
    return target


def _reads_written_state(run: list[fx.Node], call: fx.Node) -> bool:
    """Whether the run reads a parameter or buffer ``call`` wrote on the example call (a
    stateful leaf module: anything of its own)."""
    written = (call.target,) if call.op == "call_module" else call.meta.get("writes_state", ())
    read = [node.target for node in run if node.op in ("get_attr", "call_module")]
    return any(path == target or path.startswith(target + ".") or target.startswith(path + ".")
               for path in written for target in read)
