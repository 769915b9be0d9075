"""Generated code with one function per replayed template.

A 30-block model traces to some 2,600 nodes, and generating and compiling one Python
function that long costs as much as tracing it (0.13 s at 1.3B). Blocks replayed from one
template are the same nodes with the module path moved, so their code is generated once,
as a function whose ``self`` is the block, and the model's function calls it per block
with the block module and the block's inputs. The fx graph itself stays flat: matching,
reports and validation read every node; only the executable code is outlined.

An instance is outlined only when that is provably the same program: its live nodes line
up with the template's one for one, it reads nothing defined after its first node except
plain attribute reads, and nothing before the call site reads its results.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx

from ..tracing.tracer import ModuleCall, template_groups


@dataclass
class Instance:
    """One outlinable call: its body (graph order), inputs, results and call site."""

    module_path: str
    body: list[fx.Node]
    externals: list[fx.Node]
    outputs: list[fx.Node]
    site: int  # position in the graph before which the call is emitted
    shape: tuple  # the body's structure, equal across instances of one template


def find_instances(graph: fx.Graph, calls: Sequence[ModuleCall]) -> list[list[Instance]]:
    """Groups of at least two structurally identical instances, outermost calls first."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    taken: set[fx.Node] = set()
    found: list[list[Instance]] = []
    for members in sorted(template_groups(calls), key=lambda ms: ms[0].depth):
        if len(members) < 2:
            continue
        instances = [inst for inst in (_instance(call, nodes, position, taken) for call in members)
                     if inst is not None]
        same = [inst for inst in instances if inst.shape == instances[0].shape] if instances else []
        if len(same) >= 2:
            found.append(same)
            for inst in same:
                taken.update(inst.body)
    return found


def _instance(call: ModuleCall, nodes: list[fx.Node], position: dict[fx.Node, int],
              taken: set[fx.Node]) -> Instance | None:
    prefix = call.qualname + "."
    live = [n for n in call.nodes if n in position]
    if not live or any(n in taken for n in live):
        return None
    # Reads of attributes outside the block (a shared RoPE table) stay in the caller.
    body = [n for n in live if not (n.op == "get_attr" and not n.target.startswith(prefix))]
    if not body or any(n.op in ("placeholder", "output") or
                       (n.op == "call_module" and not n.target.startswith(prefix)) for n in body):
        return None
    inside = set(body)
    index = {n: i for i, n in enumerate(body)}
    externals: list[fx.Node] = []
    shape = []
    for node in body:
        refs = []
        for arg in node.all_input_nodes:
            if arg in inside:
                refs.append(index[arg])
            else:
                if arg not in externals:
                    externals.append(arg)
                refs.append(-1 - externals.index(arg))
        target = node.target[len(prefix):] if node.op in ("get_attr", "call_module") else node.target
        shape.append((node.op, target, tuple(refs)))
    outputs = [n for n in body if any(user not in inside for user in n.users)]
    first = position[body[0]]
    site = max([first] + [position[e] + 1 for e in externals])
    # Between the first body node and the call site only attribute reads may stand, and
    # nothing before the site may read the call's results.
    if any(n.op != "get_attr" for n in nodes[first:site] if n not in inside):
        return None
    # Nodes interleaved after the site (a rule's injection reading an early result) run after
    # the whole body instead of amid it: allowed only when they cannot have side effects.
    if any(not _pure(n) for n in nodes[site:position[body[-1]]] if n not in inside):
        return None
    if any(position[user] < site for out in outputs for user in out.users if user not in inside):
        return None
    if not outputs:
        return None
    shape.append(("outputs", tuple(index[o] for o in outputs), len(externals)))
    return Instance(call.qualname, body, externals, outputs, site, tuple(shape))


def _pure(node: fx.Node) -> bool:
    if node.op in ("call_module", "placeholder", "output"):
        return False
    if node.op == "call_method":
        return not (node.target.endswith("_") or "opaque_helper" in node.meta)
    return node.target is not operator.setitem


def template_function(instance: Instance, name: str,
                      compile_graph: Callable[[fx.Graph], tuple[str, Callable[..., Any]]]
                      ) -> tuple[str, Callable[..., Any]]:
    """``fn(block, *externals)`` computing ``instance.outputs`` (a tuple when several), and its source."""
    prefix = instance.module_path + "."
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, external in enumerate(instance.externals):
        env[external] = sub.placeholder(f"in{i}")
    for node in instance.body:
        copy = sub.node_copy(node, env.__getitem__)
        if node.op in ("get_attr", "call_module"):
            copy.target = node.target[len(prefix):]
        env[node] = copy
    results = [env[o] for o in instance.outputs]
    sub.output(results[0] if len(results) == 1 else tuple(results))
    source, fn = compile_graph(sub)
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = __name__
    return source.replace("def forward(", f"def {name}(", 1), fn


def outlined_graph(graph: fx.Graph, groups: list[list[Instance]],
                   functions: list[Callable[..., Any]]) -> fx.Graph:
    """``graph`` with each instance's body replaced by one call of its template function."""
    at_site: dict[int, list[tuple[Instance, Callable[..., Any]]]] = {}
    skipped: set[fx.Node] = set()
    for members, fn in zip(groups, functions):
        for inst in members:
            at_site.setdefault(inst.site, []).append((inst, fn))
            skipped.update(inst.body)
    outer = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for position, node in enumerate(graph.nodes):
        for inst, fn in at_site.get(position, ()):
            block = outer.get_attr(inst.module_path)
            call = outer.call_function(fn, (block, *[env[e] for e in inst.externals]))
            if len(inst.outputs) == 1:
                env[inst.outputs[0]] = call
            else:
                for i, out in enumerate(inst.outputs):
                    env[out] = outer.call_function(operator.getitem, (call, i))
        if node not in skipped:
            env[node] = outer.node_copy(node, env.__getitem__)
    return outer
