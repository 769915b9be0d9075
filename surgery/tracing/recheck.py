"""Re-deriving a trace's Python decisions for inputs of new shapes, on fake tensors.

A specialised graph records shape arithmetic as nodes, so it computes the right sizes at
any resolution. What it freezes are the values Python took from the example (a loop
count, an ``if``, a ``.tolist()`` nesting): each one is a :class:`Concretisation` on a
node. For a call whose input sizes differ from the trace, :class:`ShapeRecheck` evaluates
only those nodes' ancestors, on the fake twin with fake copies of the inputs, and compares
every value with the traced one. Equal values mean a fresh trace would take the same
branches and so build the same graph; the specialisation is reused.

The decisions at the end of the model (``for u in x`` over the head's output) depend on
every block. Identical blocks are replays of one template, so an instance whose inputs
have the metadata an earlier instance of the same template had gets that instance's output
metadata and decisions without running again: the recheck runs one block per template, not
thirty. (A replayed copy records the template's decisions on its own nodes, so a copy whose
inputs differ from every earlier instance's re-derives them itself.)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .guards import CONVERSIONS
from .tracer import _FACTORY_IDS, Concretisation, ModuleCall, fetch_attribute, module_key, template_groups
from .twin import compiled_code_runs_eagerly, fake_inputs, fake_mode_of, is_fake, run_factory


class _Unkeyable(Exception):
    pass


_UNSET = object()


def _meta_key(value: Any) -> Any:
    """Everything an op's output metadata can depend on, for one input value."""
    if isinstance(value, torch.Tensor):
        head = ("t", tuple(value.shape), tuple(value.stride()), value.dtype, value.device.type)
        symbolic = is_fake(value) or value.device.type == "meta"
        if not symbolic and not value.is_floating_point() and value.numel() <= 64:
            return head + (tuple(value.flatten().tolist()),)  # real cache indices: values matter
        if not symbolic:
            raise _Unkeyable
        return head
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_meta_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _meta_key(v)) for k, v in value.items()))
    if isinstance(value, nn.Module):
        return ("module", id(value))
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype, torch.device, slice)):
        return ("v", type(value).__name__, repr(value))
    raise _Unkeyable


@dataclass
class _Instance:
    """One call of a replayed template, as a contiguous group of graph nodes."""

    group: int
    nodes: list[fx.Node]
    externals: list[tuple[int, fx.Node]]  # (position among the externals, node) that the slice needs
    outputs: list[tuple[int, fx.Node]]  # (position in ``nodes``, node) used after the call


def _all_symbolic(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return is_fake(value) or value.device.type == "meta"
    if isinstance(value, (list, tuple)):
        return all(_all_symbolic(v) for v in value)
    return isinstance(value, (bool, int, float, type(None), torch.Size))


def _ancestors(targets: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(targets)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def _instances(calls: Sequence[ModuleCall], needed: set[fx.Node]) -> dict[fx.Node, list[_Instance]]:
    starts: dict[fx.Node, list[_Instance]] = {}
    for group, members in enumerate(template_groups(calls)):
        if len(members) < 2:
            continue
        for call in members:
            if not call.nodes:
                continue
            inside = set(call.nodes)
            externals: list[fx.Node] = []
            for node in call.nodes:
                for arg in node.all_input_nodes:
                    if arg not in inside and arg not in externals:
                        externals.append(arg)
            outputs = [(i, n) for i, n in enumerate(call.nodes) if n in needed and any(u not in inside for u in n.users)]
            instance = _Instance(group, call.nodes, [(i, n) for i, n in enumerate(externals) if n in needed], outputs)
            starts.setdefault(call.nodes[0], []).append(instance)
    for found in starts.values():
        found.sort(key=lambda inst: -len(inst.nodes))  # the outermost call first
    return starts


class ShapeRecheck:
    """The slice of a specialised graph that re-derives its concretised values."""

    def __init__(self, graph: fx.Graph, concretised: Sequence[Concretisation], calls: Sequence[ModuleCall],
                 twin: nn.Module) -> None:
        self.concretised = list(concretised)
        needed = _ancestors(c.node for c in self.concretised)
        # Pruning erases the nodes that only fed decisions and clears their arguments, so
        # each step keeps its own copy of what it computes from.
        self.steps = [_Step(node, node.op, node.target, node.args, node.kwargs)
                      for node in graph.nodes if node in needed]
        self.starts = _instances(calls, needed)
        self.twin = twin

    def first_failure(self, inputs: dict[str, Any]) -> str | None:
        """``None`` if every concretised value comes out as traced, else the first that differs.

        Values are compared as soon as they are computed, so a changed decision is named
        before the ops behind it (which assumed the old branch) fail on the new shapes.
        """
        checks: dict[fx.Node, list[Concretisation]] = {}
        for item in self.concretised:
            checks.setdefault(item.node, []).append(item)
        mode = fake_mode_of(self.twin)
        metas = fake_inputs(inputs, mode) if mode is not None else inputs
        env: dict[fx.Node, Any] = {}
        seen: dict[tuple, _Instance] = {}
        skip: set[fx.Node] = set()
        results: dict[tuple, Any] = {}
        with torch.no_grad(), compiled_code_runs_eagerly():
            for step in self.steps:
                node = step.node
                if node in skip:
                    continue
                for instance in self.starts.get(node, ()):
                    if self._reuse(instance, env, seen):
                        skip.update(instance.nodes)
                        # Its decisions are the earlier instance's: same template, same inputs.
                        for inside in instance.nodes:
                            failure = self._compare(checks.pop(inside, ()), env.get(inside, _UNSET))
                            if failure is not None:
                                return failure
                        break
                if node in skip:
                    continue
                try:
                    env[node] = step.run_once(env, metas, self.twin, results)
                except Exception as error:  # the new shapes break an op the old branch chose
                    return f"re-deriving the traced decisions failed at {node.name} ({type(error).__name__}: " \
                           f"{str(error).splitlines()[0] if str(error) else ''})"
                failure = self._compare(checks.pop(node, ()), env[node])
                if failure is not None:
                    return failure
        if checks:
            item = next(iter(checks.values()))[0]
            return f"`{item.guard.expr}` at {item.guard.where}: not re-derived"
        return None

    @staticmethod
    def _compare(items: Iterable[Concretisation], value: Any) -> str | None:
        """``None`` if ``value`` gives each of the traced values ``items`` took from it."""
        for item in items:
            if value is _UNSET:
                return f"`{item.guard.expr}` at {item.guard.where}: not re-derived"
            try:
                actual = CONVERSIONS[item.convert](value)
            except Exception as error:
                return f"`{item.guard.expr}` at {item.guard.where}: {type(error).__name__}"
            if actual != item.value:
                return f"`{item.guard.expr}` at {item.guard.where}: {actual!r} != traced {item.value!r}"
        return None

    @staticmethod
    def _reuse(instance: _Instance, env: dict, seen: dict) -> bool:
        """Take ``instance``'s values from an earlier instance with the same input metadata."""
        try:
            key = (instance.group, tuple((i, _meta_key(env[n])) for i, n in instance.externals))
        except (_Unkeyable, KeyError):
            return False
        earlier = seen.setdefault(key, instance)
        if earlier is instance or any(earlier.nodes[i] not in env for i, _ in instance.outputs):
            return False
        for node, same in zip(instance.nodes, earlier.nodes):
            if same in env:
                env[node] = env[same]
        return True


@dataclass(frozen=True)
class _Step:
    node: fx.Node
    op: str
    target: Any
    args: tuple
    kwargs: dict

    @property
    def memoisable(self) -> bool:
        """Pure and not trivially cheap: worth keying by its inputs' metadata."""
        if self.op == "call_function":
            return self.target not in (operator.getitem, getattr, operator.setitem)
        if self.op == "call_method":
            return not self.target.endswith("_") and "opaque_helper" not in self.node.meta
        # A leaf handed no container (so no cache it could write; checked on the values in
        # ``run_once``) is a function of its module's structure and its inputs' metadata.
        return self.op == "call_module"

    def run_once(self, env: dict, inputs: dict[str, Any], twin: nn.Module, results: dict[tuple, Any]) -> Any:
        """``run``, or the result of an earlier step with the same op on the same metadata
        (e.g. the thirty injections ``x + hint * scale`` of one resolution are one computation)."""
        if not self.memoisable:
            return self.run(env, inputs, twin)
        try:
            args = fx.node.map_arg(self.args, env.__getitem__)
            kwargs = fx.node.map_arg(self.kwargs, env.__getitem__)
            if self.op == "call_module":
                if any(isinstance(a, (list, dict)) for a in (*args, *kwargs.values())):
                    return self.run(env, inputs, twin)
                what: Any = module_key(twin.get_submodule(self.target))
            else:
                what = self.target
            key = (self.op, what, _meta_key(args), _meta_key(kwargs))
        except _Unkeyable:
            return self.run(env, inputs, twin)
        if key not in results:
            value = self.run(env, inputs, twin)
            if not _all_symbolic(value):
                return value  # real values (cache indices) are never shared between nodes
            results[key] = value
        return results[key]

    def run(self, env: dict, inputs: dict[str, Any], twin: nn.Module) -> Any:
        if self.op == "placeholder":
            return twin if self.target == "root" else inputs[self.target]
        if self.op == "get_attr":
            return fetch_attribute(twin, self.target)
        args = fx.node.map_arg(self.args, env.__getitem__)
        kwargs = fx.node.map_arg(self.kwargs, env.__getitem__)
        if self.op == "call_function":
            if id(self.target) in _FACTORY_IDS:
                return run_factory(fake_mode_of(twin), self.target, args, kwargs)
            return self.target(*args, **kwargs)
        if self.op == "call_method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        if self.op == "call_module":
            return twin.get_submodule(self.target)(*args, **kwargs)
        raise ValueError(f"cannot re-derive a {self.op} node")
