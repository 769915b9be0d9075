"""Canonical, diff-friendly serialisation of a ``torch.fx.Graph``.

fx renames nodes whenever a graph is rewritten (``add`` becomes ``add_3``), so a naive
diff of ``gm.code`` is mostly noise. Canonical names here depend only on what a node
*is* and where it sits in the module hierarchy, never on fx's generated names or on
object ids:

- ``%in:x``                placeholder ``x``
- ``%attr:freqs``          ``get_attr freqs``
- ``%blocks.0.ffn.0``      ``call_module blocks.0.ffn.0`` (ModuleList indices kept)
- ``%blocks.0/add``        a ``call_function``/``call_method`` inside module ``blocks.0``
- ``%@<rule>.inject.0/add`` a node that surgery inserted outside any module (rule, role,
  index), e.g. ``%@vace.inject.0/add``
- ``%out``                 the output node

A base name that occurs again gets ``#k`` (``%blocks.0/add#1``), counted in graph order.
Because counters are per scope, inserting one op into ``blocks.3`` leaves every name
outside ``blocks.3`` untouched, which keeps before/after diffs local to the change.

One line per node; a node that a rule inserted ends in ``# <rule>:<role>``, e.g. ``# vace:inject``::

    %blocks.0/add = call_function operator.add(%blocks.0.l, 1) :: float32[1,8,64]  # <rule>:inject
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx

#: First line of every canonical text; bump the version when the format changes.
HEADER = "# surgery canonical graph v1"

_DYNAMO_SELF = re.compile(r"^L\['self'\]\.?|^L__self___?")


@dataclass(frozen=True)
class CanonNode:
    """One node in canonical form; ``args``/``kwargs`` are already rendered strings."""

    name: str
    op: str
    target: str
    args: str
    scope: str
    meta: str = ""
    role: str = ""
    inputs: tuple[str, ...] = field(default=())

    def line(self) -> str:
        """The node as one canonical text line."""
        head = f"{self.op} {self.target}" if self.target else self.op
        text = f"{self.name} = {head}({self.args})"
        if self.meta:
            text += f" :: {self.meta}"
        if self.role:
            text += f"  # {self.role}"
        return text


def qualified_name(fn: Any) -> str:
    """Stable dotted name of a callable (``torch.cat``, ``operator.add``, ``torch.nn.functional.linear``)."""
    if isinstance(fn, str):
        return fn
    try:
        name = torch.fx.node._get_qualified_name(fn)
    except Exception:  # fx raises on callables without __name__; fall back below
        module = getattr(fn, "__module__", None) or type(fn).__module__
        name = f"{module}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    # Builtin homes vary by Python build; normalise to the public module name.
    if name.startswith("_operator."):
        name = "operator." + name[len("_operator."):]
    elif name.startswith("torch._C._nn."):
        short = name[len("torch._C._nn."):]
        if getattr(torch.nn.functional, short, None) is fn:
            name = "torch.nn.functional." + short
    elif name.startswith("torch._C._VariableFunctions."):
        name = "torch." + name[len("torch._C._VariableFunctions."):]
    return name


def _short_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    qual = qualified_name(node.target)
    return qual.rsplit(".", 1)[-1]


def _normalise_path(path: str) -> str:
    """Turn dynamo-style scope strings (``L['self'].blocks[0]``) into module paths (``blocks.0``)."""
    path = _DYNAMO_SELF.sub("", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    return path.strip(".")


def module_scope(node: torch.fx.Node) -> str:
    """The innermost module path a node was traced inside ('' for the top level).

    Uses ``nn_module_stack`` when the tracer recorded it; a ``call_module`` node's scope is
    its own target, an unscoped ``get_attr``'s the owner of the attribute.
    """
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        value = list(stack.values())[-1]
        path = value[0] if isinstance(value, tuple) else str(value)
        return _normalise_path(str(path))
    if node.op == "get_attr":
        # Outside any traced module call, an attribute belongs to the module that owns it.
        return str(node.target).rpartition(".")[0]
    return ""


def surgery_role(node: torch.fx.Node) -> str:
    """``"rule:role"`` for nodes that surgery inserted, else ''."""
    info = node.meta.get("surgery")
    if isinstance(info, dict) and info.get("role"):
        return f"{info.get('rule', '?')}:{info['role']}"
    return ""


def _base_name(node: torch.fx.Node) -> str:
    if node.op == "placeholder":
        return f"%in:{node.target}"
    if node.op == "get_attr":
        return f"%attr:{node.target}"
    if node.op == "call_module":
        return f"%{node.target}"
    if node.op == "output":
        return "%out"
    scope = module_scope(node)
    if not scope:
        info = node.meta.get("surgery")
        if isinstance(info, dict) and info.get("role"):
            scope = f"@{info.get('rule', '?')}.{info['role']}"
            if info.get("index") is not None:
                scope += f".{info['index']}"
    return f"%{scope}/{_short_name(node)}" if scope else f"%{_short_name(node)}"


def canonical_names(graph: torch.fx.Graph) -> dict[torch.fx.Node, str]:
    """Map every node of ``graph`` to its canonical name (see the module docstring)."""
    counts: dict[str, int] = {}
    names: dict[torch.fx.Node, str] = {}
    taken: set[str] = set()
    for node in graph.nodes:
        base = _base_name(node)
        k = counts.get(base, 0)
        name = base if k == 0 else f"{base}#{k}"
        # A literal base like "%add#1" could in principle collide with a counted one.
        while name in taken:
            k += 1
            name = f"{base}#{k}"
        counts[base] = k + 1
        taken.add(name)
        names[node] = name
    return names


def render_value(value: Any, names: dict[torch.fx.Node, str]) -> str:
    """Stable text for an fx argument: node references by canonical name, literals by value.

    Tensors and arbitrary objects become a type tag (``<Tensor>``) so that memory addresses
    and tensor contents never reach the canonical text.
    """
    if isinstance(value, torch.fx.Node):
        return names[value]
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f"float('{value}')"
    if isinstance(value, complex):
        return repr(value)
    if value is Ellipsis:
        return "..."
    if isinstance(value, slice):
        parts = [render_value(p, names) for p in (value.start, value.stop, value.step)]
        return f"slice({', '.join(parts)})"
    if isinstance(value, torch.Size):
        return f"Size({list(value)})"
    if isinstance(value, tuple):
        inner = ", ".join(render_value(v, names) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(render_value(v, names) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{render_value(k, names)}: {render_value(v, names)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(value) if isinstance(value, torch.dtype) else f"{type(value).__name__}({str(value)!r})"
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, torch.Tensor):
        return "<Tensor>"
    if callable(value) and hasattr(value, "__name__"):
        return qualified_name(value)
    return f"<{type(value).__name__}>"


def render_meta(value: Any) -> str:
    """Short ``dtype[shape]`` summary of a node's ``example_value`` ('' when unknown)."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        shape = ",".join(str(d) for d in value.shape)
        return f"{dtype}[{shape}]"
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return "(" + ", ".join(render_meta(v) for v in value) + ")"
    return ""


def _node_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return list(node.all_input_nodes)


def canonical_nodes(graph: torch.fx.Graph, *, shapes: bool = True) -> list[CanonNode]:
    """Canonical form of every node of ``graph``, in graph order.

    ``shapes`` adds the ``dtype[shape]`` of ``node.meta["example_value"]`` (or ``"val"``)
    when the tracer recorded one.
    """
    names = canonical_names(graph)
    out: list[CanonNode] = []
    for node in graph.nodes:
        if node.op == "call_function":
            target = qualified_name(node.target)
        else:
            target = str(node.target) if node.op != "output" else ""
        parts = [render_value(a, names) for a in node.args]
        parts += [f"{k}={render_value(v, names)}" for k, v in node.kwargs.items()]
        if node.op == "placeholder":
            # Placeholder defaults live in args; the target is the parameter name.
            parts = [f"default={p}" for p in parts]
        meta = ""
        if shapes:
            example = node.meta.get("example_value", node.meta.get("val"))
            meta = render_meta(example)
        out.append(
            CanonNode(
                name=names[node],
                op=node.op,
                target=target,
                args=", ".join(parts),
                scope=module_scope(node),
                meta=meta,
                role=surgery_role(node),
                inputs=tuple(names[i] for i in _node_inputs(node)),
            )
        )
    return out


def canonical_text(graph: torch.fx.Graph, *, shapes: bool = True) -> str:
    """The whole graph as canonical text: a header line, then one line per node."""
    lines = [HEADER] + [n.line() for n in canonical_nodes(graph, shapes=shapes)]
    return "\n".join(lines) + "\n"


def canonical_edges(graph: torch.fx.Graph) -> list[tuple[str, str]]:
    """Every data edge ``(producer, consumer)`` by canonical name, in consumer order."""
    return [(src, n.name) for n in canonical_nodes(graph, shapes=False) for src in n.inputs]


def canonical_edge_text(graph: torch.fx.Graph) -> str:
    """The edge list as text, one ``%a -> %b`` per line."""
    return "".join(f"{a} -> {b}\n" for a, b in canonical_edges(graph))


def canonical_graph_dict(graph: torch.fx.Graph, *, shapes: bool = True) -> dict[str, Any]:
    """JSON-ready form: ``{"format", "nodes": [...], "edges": [[src, dst], ...]}``."""
    nodes = canonical_nodes(graph, shapes=shapes)
    return {
        "format": HEADER.lstrip("# "),
        "nodes": [
            {
                "name": n.name,
                "op": n.op,
                "target": n.target,
                "args": n.args,
                "scope": n.scope,
                "meta": n.meta,
                "role": n.role,
                "inputs": list(n.inputs),
            }
            for n in nodes
        ],
        "edges": [[src, n.name] for n in nodes for src in n.inputs],
    }


_LINE = re.compile(r"^(?P<name>%\S+) = (?P<op>[a-z_]+) ?(?P<rest>.*)$")


@dataclass(frozen=True)
class ParsedLine:
    """A canonical text line split into the parts a diff needs."""

    name: str
    op: str
    target: str
    scope: str
    role: str
    text: str


def parse_canonical(text: str) -> list[ParsedLine]:
    """Parse canonical text back into lines (comments and blank lines are skipped).

    Only what diffs need is recovered: name, op, target, scope and role; ``text`` is the
    full original line.
    """
    out: list[ParsedLine] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            continue
        name, op, rest = match["name"], match["op"], match["rest"]
        target = rest.split("(", 1)[0]
        role = rest.rsplit("  # ", 1)[1] if "  # " in rest else ""
        out.append(ParsedLine(name=name, op=op, target=target, scope=scope_of_name(name, op, target), role=role, text=line))
    return out


def scope_of_name(name: str, op: str, target: str) -> str:
    """Recover the module path of a node from its canonical name."""
    if op == "call_module":
        return target
    base = name[1:].split("#", 1)[0]
    if op in ("call_function", "call_method") and "/" in base:
        return base.rsplit("/", 1)[0]
    return ""


def iter_lines(graph: torch.fx.Graph) -> Iterable[str]:
    """Canonical lines of ``graph`` without the header (handy for asserts)."""
    return (n.line() for n in canonical_nodes(graph))


__all__ = [
    "HEADER",
    "CanonNode",
    "ParsedLine",
    "canonical_edge_text",
    "canonical_edges",
    "canonical_graph_dict",
    "canonical_names",
    "canonical_nodes",
    "canonical_text",
    "iter_lines",
    "module_scope",
    "parse_canonical",
    "qualified_name",
    "render_value",
    "scope_of_name",
    "surgery_role",
]
