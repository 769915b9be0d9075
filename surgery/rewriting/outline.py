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

A module compiled with ``module.compile()`` is never inlined or outlined: its body is
replaced by one call of the module itself, so that its compiled call runs
(:func:`module_call_sites`); the same conditions make that call the same program, and the
module's own return value gives the results the rest of the graph reads.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..errors import TraceError
from ..tracing.tracer import ModuleCall, template_groups


@dataclass
class Instance:
    """One outlinable call: its body (graph order), inputs, results and call site."""

    module_path: str
    body: list[fx.Node]
    externals: list[fx.Node]
    outputs: list[fx.Node]
    site: int  # position in the graph before which the call is emitted
    shape: tuple  # the body's structure, equal across instances of one template (not its outputs)
    hoisted: list[fx.Node] = field(default_factory=list)  # later pure inputs, computed before the call
    own: int = 0  # how many of ``body`` are the call's own nodes (the rest: the rule's code after it)


def find_instances(graph: fx.Graph, calls: Sequence[ModuleCall],
                   taken: set[fx.Node] | None = None) -> list[list[Instance]]:
    """Groups of at least two structurally identical instances, outermost calls first
    (none of whose nodes are ``taken``: called as modules instead)."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    taken = set() if taken is None else set(taken)
    owned = {node for call in calls for node in call.nodes}
    found: list[list[Instance]] = []
    for members in sorted(template_groups(calls), key=lambda ms: ms[0].depth):
        if len(members) < 2:
            continue
        by_shape: dict[tuple, list[Instance]] = {}
        for call in members:
            inst = _instance(call, nodes, position, taken, owned)
            if inst is not None:
                by_shape.setdefault(inst.shape, []).append(inst)
        for same in by_shape.values():  # e.g. the blocks with an injection after them, and the others
            if len(same) >= 2:
                # One function returns what any instance's caller reads (the last such block's
                # stream feeds no further block, the others' do).
                used = sorted({inst.body.index(out) for inst in same for out in inst.outputs})
                for inst in same:
                    inst.outputs = [inst.body[i] for i in used]
                found.append(same)
                for inst in same:
                    taken.update(inst.body)
                    taken.update(inst.hoisted)
    return found


def _instance(call: ModuleCall, nodes: list[fx.Node], position: dict[fx.Node, int],
              taken: set[fx.Node], owned: set[fx.Node] | None = None) -> Instance | None:
    """The call as an instance, or ``None`` when moving its body into one call could change
    what the program does. With ``owned`` (the nodes of every traced call), the rule's code
    right after the call joins the body."""
    prefix = call.qualname + "."
    live = [n for n in call.nodes if n in position]
    if not live or any(n in taken for n in live):
        return None
    # Reads of attributes outside the block (a shared RoPE table) stay in the caller.
    body = [n for n in live if not (n.op == "get_attr" and not n.target.startswith(prefix))]
    if not body or any(n.op in ("placeholder", "output") or
                       (n.op == "call_module" and not n.target.startswith(prefix)) for n in body):
        return None
    own = len(body)
    if owned is not None:
        body += _rule_code_after(body, nodes, position, taken, owned, prefix)
    inside = set(body)
    refs: dict[fx.Node, tuple] = {n: ("in", i) for i, n in enumerate(body)}
    externals: list[fx.Node] = []
    shape = []
    for node in body:
        for arg in node.all_input_nodes:
            if arg not in refs:
                refs[arg] = ("ext", len(externals))
                externals.append(arg)
        target = node.target[len(prefix):] if node.op in ("get_attr", "call_module") else node.target
        shape.append((node.op, target, _structure((node.args, node.kwargs), refs)))
    outputs = [n for n in body if any(user not in inside for user in n.users)]
    first = position[body[0]]
    # Pure values the rule computed after the call from earlier values only (a scale picked
    # from a list) are computed before the call instead, and handed to it.
    hoisted = [e for e in externals if position[e] > first and e not in taken and _hoistable(e, position, first)]
    site = max([first] + [position[e] + 1 for e in externals if e not in hoisted])
    # Between the first body node and the call site only attribute reads may stand, and
    # nothing before the site may read the call's results.
    if any(n.op != "get_attr" for n in nodes[first:site] if n not in inside and n not in hoisted):
        return None
    # Nodes interleaved after the site (a rule's injection reading an early result) run after
    # the whole body instead of amid it: allowed only when they cannot have side effects.
    if any(not _pure(n) for n in nodes[site:position[body[-1]]] if n not in inside):
        return None
    if any(position[user] < site for out in outputs for user in out.users if user not in inside):
        return None
    if not outputs:
        return None
    return Instance(call.qualname, body, externals, outputs, site, tuple(shape), hoisted, own)


def _rule_code_after(body: list[fx.Node], nodes: list[fx.Node], position: dict[fx.Node, int],
                     taken: set[fx.Node], owned: set[fx.Node], prefix: str) -> list[fx.Node]:
    """The rule's nodes right after ``body`` that compute from its results (an injection after
    a block, the output projection of a grafted block; e.g. VACE's ``x + hint * scale``).

    Moved into the call, they leave no tensor work between consecutive calls in the
    generated forward: with ``torch.compile``, a call whose code graph-breaks splits the
    forward around it, and work between two such calls would be a compiled graph of its own
    for every block. Only pure nodes are passed over (they then run after the moved ones),
    and a moved node may read only the body, values from before it, or pure values computed
    from those (computed before the call instead, see ``Instance.hoisted``).
    """
    inside = set(body)
    first = position[body[0]]
    found: list[fx.Node] = []
    for node in nodes[position[body[-1]] + 1:]:
        if node in taken or node in owned or node.op in ("placeholder", "output"):
            break  # another call's code, or the end
        reads_body = any(arg in inside for arg in node.all_input_nodes)
        if not reads_body:
            if not _pure(node):
                break
            continue
        if "surgery" not in node.meta or (node.op == "call_module" and not node.target.startswith(prefix)):
            break  # the model's own code continues from the call's results
        if not all(arg in inside or position[arg] < first or _hoistable(arg, position, first)
                   for arg in node.all_input_nodes):
            break
        inside.add(node)
        found.append(node)
    return found


def _hoistable(node: fx.Node, position: dict[fx.Node, int], first: int) -> bool:
    """A pure value computed only from values that exist before position ``first``."""
    return node.op != "get_attr" and _pure(node) and all(position[a] < first for a in node.all_input_nodes)


def _structure(value: Any, refs: dict[fx.Node, tuple]) -> Any:
    """A node's arguments for comparing structures: nodes by their place (``refs``), constants
    by value where that is safe to compare, other objects by identity."""
    kind = type(value)
    if kind is fx.Node:
        return refs[value]
    if kind in _SIMPLE:
        return value
    if isinstance(value, (tuple, list)):
        return tuple([_structure(v, refs) for v in value])
    if isinstance(value, dict):
        return tuple([(k, _structure(v, refs)) for k, v in value.items()])
    if kind is slice:
        return ("slice", _structure(value.start, refs), _structure(value.stop, refs), _structure(value.step, refs))
    if isinstance(value, _CONSTANTS):
        return value
    return ("object", id(value))


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
    sub = fx.Graph()
    env = {external: sub.placeholder(f"in{i}") for i, external in enumerate(instance.externals)}
    return _function(sub, env, instance, instance.body, name, compile_graph)


def _function(sub: fx.Graph, env: dict[fx.Node, fx.Node], instance: Instance, nodes: list[fx.Node], name: str,
              compile_graph: Callable[[fx.Graph], tuple[str, Callable[..., Any]]]) -> tuple[str, Callable[..., Any]]:
    """``nodes`` copied after ``sub``'s placeholders (``env``), as a function ``name`` of the module
    (``self``) returning ``instance.outputs``, and its source."""
    prefix = instance.module_path + "."
    for node in nodes:
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


def template_functions(groups: list[list[Instance]],
                       compile_graph: Callable[[fx.Graph], tuple[str, Callable[..., Any]]]
                       ) -> list[tuple[str, Callable[..., Any]]]:
    """Each group's function (see :func:`template_function`) and its source, in order.

    A group whose body ends with the rule's code (blocks with an injection after them) gets a
    function that calls the function of the call's own body, then runs the rule's code; the
    body function is the one of the group of the same calls without rule code, when there is
    one (its outputs are widened to what either reads). Under ``torch.compile`` a body whose
    code graph-breaks is then compiled once for every block, the rule's code is a graph of its
    own, and the blocks with rule code after them add one graph instead of repeating the body's.
    """
    bodies: dict[tuple, list[int]] = {}  # the own body's structure -> the positions any caller reads
    for members in groups:
        inst = members[0]
        key = inst.shape[:inst.own]
        read = bodies.setdefault(key, [])
        read += [i for i in _body_reads(inst) if i not in read]
    for members in groups:
        if members[0].own == len(members[0].body):  # a body without rule code returns what any caller reads
            for inst in members:
                inst.outputs = [inst.body[i] for i in sorted(bodies[inst.shape])]
    made: dict[tuple, tuple[str, Callable[..., Any]]] = {}
    for i, members in enumerate(groups):
        inst = members[0]
        if inst.own == len(inst.body):
            made[inst.shape] = template_function(inst, f"surgery_template_{i}", compile_graph)
    functions = []
    for i, members in enumerate(groups):
        inst = members[0]
        name = f"surgery_template_{i}"
        if inst.own == len(inst.body):
            functions.append(made[inst.shape])
            continue
        key = inst.shape[:inst.own]
        shared = key in made
        if not shared:
            made[key] = template_function(_own_body(inst, sorted(bodies[key])), f"{name}_body", compile_graph)
        source, fn = _with_rule_code(inst, sorted(bodies[key]), made[key][1], name, compile_graph)
        functions.append((source if shared else made[key][0] + source, fn))
    return functions


def _body_reads(inst: Instance) -> list[int]:
    """Positions of the own body's nodes that the rule's code or the caller reads."""
    own = {node: i for i, node in enumerate(inst.body[:inst.own])}
    read = {own[arg] for node in inst.body[inst.own:] for arg in node.all_input_nodes if arg in own}
    return sorted(read | {own[node] for node in inst.outputs if node in own})


def _own_body(inst: Instance, outputs: list[int]) -> Instance:
    body = inst.body[:inst.own]
    externals = [e for e in inst.externals if any(e in n.all_input_nodes for n in body)]
    return Instance(inst.module_path, body, externals, [body[i] for i in outputs], inst.site,
                    inst.shape[:inst.own], own=inst.own)


def _with_rule_code(inst: Instance, outputs: list[int], body: Callable[..., Any], name: str,
                    compile_graph: Callable[[fx.Graph], tuple[str, Callable[..., Any]]]
                    ) -> tuple[str, Callable[..., Any]]:
    """``fn(block, *externals)``: the body function, then the rule's code on its results."""
    own_externals = len(_own_body(inst, outputs).externals)  # the first ones (collected in body order)
    sub = fx.Graph()
    env = {inst.body[i]: sub.placeholder(f"r{i}") for i in outputs}
    env.update({external: sub.placeholder(f"in{i}") for i, external in enumerate(inst.externals)})
    rule_source, rule = _function(sub, env, inst, inst.body[inst.own:], f"{name}_rule", compile_graph)
    params = "".join(f", in{i}" for i in range(len(inst.externals)))
    handed = "".join(f", in{i}" for i in range(own_externals))
    unpacked = "r" if len(outputs) == 1 else "*r"
    source = (f"def {name}(self{params}):\n    r = {body.__name__}(self{handed})\n"
              f"    return {name}_rule(self, {unpacked}{params})\n")
    namespace = {body.__name__: body, f"{name}_rule": rule}
    exec(compile(source, "<surgery-specialisation>", "exec"), namespace)
    fn = namespace[name]
    fn.__module__ = __name__
    return rule_source.rstrip() + "\n\n" + source, fn


@dataclass(frozen=True)
class Attribute:
    """A module attribute passed to a module call (a plain tensor such as ``freqs``, an object)."""

    path: str


@dataclass
class ModuleCallSite:
    """A compiled module's traced body, to be run as one call of the module."""

    instance: Instance
    arguments: tuple  # (args, kwargs): graph nodes, constants and :class:`Attribute` reads
    outputs: list[tuple]  # where each of ``instance.outputs`` is in the module's return value


def module_call_sites(graph: fx.Graph, calls: Sequence[ModuleCall], compiled: set[str],
                      attribute_path: Callable[[Any], str | None], replaced: dict[fx.Node, fx.Node],
                      rule: str = "") -> list[ModuleCallSite]:
    """A call site for each traced call of a ``compiled`` module (outermost first).

    ``replaced`` maps each value the rule put in place of a traced one to that one: a module
    whose input the rule replaced (the stream after an injection) is handed the replacement.

    Raises:
        TraceError: such a call cannot be one call of the module (the rule changed its
            inside, or the graph reads a value of it that its forward does not return).
    """
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    replacement = {old: new for new, old in replaced.items()}
    taken: set[fx.Node] = set()
    sites: list[ModuleCallSite] = []
    for call in sorted(calls, key=lambda c: c.depth):
        if call.qualname not in compiled or any(n in taken for n in call.nodes if n in position):
            continue
        inst = _instance(call, nodes, position, taken)
        if inst is None:
            live = [position[n] for n in call.nodes if n in position]
            between = nodes[min(live):max(live)] if live else []
            raise _not_one_call(call.qualname, f"rule {rule!r} changes code inside it"
                                if any("surgery" in n.meta for n in between) else
                                "its traced code cannot run as one call of it")
        read = {arg for node in inst.body for arg in node.all_input_nodes}

        def current(node: fx.Node) -> fx.Node:
            while node in replacement and node not in read:  # the body reads what replaced it
                node = replacement[node]
            return node

        arguments = _graph_argument((call.args, call.kwargs), attribute_path, call.qualname, current)
        handed = set(_nodes_in(arguments))
        if any("surgery" in arg.meta and arg not in handed for arg in read):
            raise _not_one_call(call.qualname, f"rule {rule!r} changes code inside it")
        outputs = [_output_path(call.output, node) for node in inst.outputs]
        missing = [node.name for node, path in zip(inst.outputs, outputs) if path is None]
        if missing:
            raise _not_one_call(call.qualname, f"the graph reads {missing[0]}, computed inside it and not returned")
        late = [n for n in handed if position.get(n, inst.site) >= inst.site]
        if late:
            raise _not_one_call(call.qualname, f"its argument {late[0].name} is not computed before it")
        sites.append(ModuleCallSite(inst, arguments, outputs))  # type: ignore[arg-type]
        taken.update(inst.body)
    return sites


def _not_one_call(qualname: str, why: str) -> TraceError:
    return TraceError(f"{qualname} is compiled (.compile()), but {why}, so its compiled call cannot run",
                      "compile the whole rewritten model instead: torch.compile(result.module)")


def _output_path(value: Any, node: fx.Node, path: tuple = ()) -> tuple | None:
    """Where ``node`` is in a traced return value (tuple, list and dict items), or ``None``."""
    if isinstance(value, fx.Proxy):
        return path if value.node is node else None
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, (tuple, list)) else ()
    for key, item in items:
        found = _output_path(item, node, path + (key,))
        if found is not None:
            return found
    return None


def _nodes_in(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, fx.Node) else None)
    return found


_SIMPLE = frozenset({bool, int, float, str, type(None)})
_CONSTANTS = (bool, int, float, complex, str, bytes, type(None), slice, type(Ellipsis), torch.dtype, torch.device,
              torch.memory_format, torch.layout)


def _graph_argument(value: Any, attribute_path: Callable[[Any], str | None], owner: str,
                    node_of: Callable[[fx.Node], fx.Node]) -> Any:
    """A traced call argument as a graph argument: proxies by their nodes, attributes by path."""
    if isinstance(value, fx.Proxy):
        return node_of(value.node)
    if isinstance(value, _CONSTANTS):
        return value
    if type(value) in (tuple, list):
        return type(value)(_graph_argument(v, attribute_path, owner, node_of) for v in value)
    if type(value) is dict:
        return {k: _graph_argument(v, attribute_path, owner, node_of) for k, v in value.items()}
    path = attribute_path(value)
    if path is None:
        raise _not_one_call(owner, f"it is called with a {type(value).__name__} that is neither a traced value nor a "
                                   "model attribute")
    return Attribute(path)


def outlined_graph(graph: fx.Graph, groups: list[list[Instance]], functions: list[Callable[..., Any]],
                   module_calls: Sequence[ModuleCallSite] = ()) -> fx.Graph:
    """``graph`` with each instance's body replaced by one call of its template function,
    and each compiled module's body by one call of the module."""
    at_site: dict[int, list[tuple[Instance, Any]]] = {}
    skipped: set[fx.Node] = set()
    for members, fn in zip(groups, functions):
        for inst in members:
            at_site.setdefault(inst.site, []).append((inst, fn))
            skipped.update(inst.body)
            skipped.update(inst.hoisted)
    for site in module_calls:
        at_site.setdefault(site.instance.site, []).append((site.instance, site))
        skipped.update(site.instance.body)
    outer = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def argument(value: Any) -> Any:
        if isinstance(value, Attribute):
            return outer.get_attr(value.path)
        if isinstance(value, fx.Node):
            return env[value]
        if type(value) in (tuple, list):
            return type(value)(argument(v) for v in value)
        if type(value) is dict:
            return {k: argument(v) for k, v in value.items()}
        return value

    for position, node in enumerate(graph.nodes):
        for inst, how in at_site.get(position, ()):
            if isinstance(how, ModuleCallSite):
                args, kwargs = how.arguments
                call = outer.call_module(inst.module_path, argument(args), argument(kwargs))
                for out, path in zip(inst.outputs, how.outputs):
                    value = call
                    for key in path:
                        value = outer.call_function(operator.getitem, (value, key))
                    env[out] = value
                continue
            for node_ in inst.hoisted:
                env[node_] = outer.node_copy(node_, env.__getitem__)
            block = outer.get_attr(inst.module_path)
            call = outer.call_function(how, (block, *[env[e] for e in inst.externals]))
            if len(inst.outputs) == 1:
                env[inst.outputs[0]] = call
            else:
                for i, out in enumerate(inst.outputs):
                    env[out] = outer.call_function(operator.getitem, (call, i))
        if node not in skipped:
            env[node] = outer.node_copy(node, env.__getitem__)
    return outer
