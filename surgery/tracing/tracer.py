"""Example-guided tracing: symbolic fx tracing with a concrete value beside every proxy.

Plain ``symbolic_trace`` fails on streaming models, e.g. the Wan family (``*args`` dispatch,
loops over inputs, ``.tolist()``, asserts, caches in lists of dicts). This tracer runs the model's
real entry point on example inputs and records an fx graph at the same time:

* every :class:`ConcreteProxy` carries the value the example produced, computed on a
  fake-tensor twin of the model, so tracing costs no FLOPs and never touches real state;
* when Python needs a value (``if``, ``len``, iteration, ``.item()``, ``.tolist()``) the
  tracer answers from the example and records a guard on the input properties that value
  was derived from; a value that depends on tensor *data* cannot be guarded cheaply, so
  it is an error that names the construct, its file:line and the leaf that would fix it;
* stateful leaves and cache helpers (see :mod:`.policy`) run eagerly inside the graph.

The graph's first placeholder is the model itself (``root``), so cache helpers on the
root can be called from generated code.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.fx._symbolic_trace import (
    _new_patcher,
    _orig_module_call,
    _orig_module_getattr,
    _patch_wrapped_functions,
    _autowrap_check,
)

from ..errors import TraceError
from .guards import GRAD_MODE, Field, Guard, structure, watched
from .policy import CacheValues, TracePolicy, _is_peft_layer, _is_torch_builtin, is_cache_value
from .twin import (FACTORY_NAMES, compiled_call, compiled_code_runs_eagerly, fake_mode_of, is_compiled_function,
                   is_fake, run_factory)

_MISSING = object()
_is_grad_enabled = torch.is_grad_enabled
_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "is_floating_point"})
_META_METHODS = frozenset({"size", "dim", "numel", "nelement", "get_device", "is_floating_point",
                           "is_complex", "element_size"})
_CONCRETISING_METHODS = frozenset({"item"})
_FACTORY_IDS = frozenset(id(getattr(torch, name)) for name in FACTORY_NAMES)
_TENSOR_FROM_DATA = (torch.tensor, torch.as_tensor)  # before tracing patches them
_HIDDEN = "_surgery_watched"  # where a traced module's plain attributes wait (see _attributes_watched)
_ENGINE_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.dirname(os.path.abspath(torch.__file__)))


class ConcreteProxy(fx.Proxy):
    """An fx proxy that also knows the example's value.

    ``tainted`` means the value depends on tensor data; ``deps`` are the input and model
    properties an untainted value was derived from; ``meta_deps`` the same for a tensor's
    shape, dtype and device; ``path`` locates a value inside a container input; ``ints``:
    for an integer tensor built from Python ints (``torch.tensor(u.shape[2:])``, a stack of
    those), the values it was built from (see :func:`_int_source`).
    """

    ints: Any = None

    def __init__(self, node: fx.Node, tracer: "ExampleTracer", concrete: Any = _MISSING,
                 tainted: bool = False, deps: frozenset = frozenset(),
                 meta_deps: frozenset = frozenset(), path: tuple | None = None) -> None:
        super().__init__(node, tracer)
        self.concrete = concrete
        self.tainted = tainted
        self.deps = deps
        self.meta_deps = meta_deps
        self.path = path

    def __getattr__(self, k: str) -> "ConcreteAttribute":
        return ConcreteAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.concretise_length(self)

    def __index__(self) -> int:
        return self.tracer.concretise(self, operator.index(self.concrete), "index", "index")

    def __int__(self) -> int:
        return self.tracer.concretise(self, int(self.concrete), "int()", "int")

    def __float__(self) -> float:
        return self.tracer.concretise(self, float(self.concrete), "float()", "float")

    def __repr__(self) -> str:
        return f"ConcreteProxy({self.node.name})"


class ConcreteAttribute(ConcreteProxy):
    """``proxy.attr``: a node only when used as a value, a method call otherwise."""

    def __init__(self, root: ConcreteProxy, attr: str) -> None:
        self.root = root
        self.attr = attr
        self.tracer = root.tracer
        self._node: fx.Node | None = None
        self.concrete = getattr(root.concrete, attr)
        meta = attr in _META_ATTRS
        self.tainted = root.tainted and not meta
        self.deps = root.deps | (root.meta_deps if meta else frozenset())
        self.meta_deps = root.meta_deps
        self.path = None
        if root.path is not None and not isinstance(root.concrete, torch.Tensor) and not callable(self.concrete):
            # A field of a cache object (``state.layers[0].length``) is guarded like an item.
            self.tracer._child_of_container(self, root.path + (Field(attr),), self.concrete)

    @property
    def node(self) -> fx.Node:  # type: ignore[override]
        if self._node is None:
            self._node = self.tracer.create_proxy("call_function", getattr, (self.root, self.attr), {}).node
        return self._node

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self.tracer.create_proxy("call_method", self.attr, (self.root,) + args, kwargs)


def _concrete(value: Any) -> Any:
    if isinstance(value, ConcreteProxy):
        return value.concrete
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_concrete(v) for v in value)
    if isinstance(value, list):
        return [_concrete(v) for v in value]
    if isinstance(value, dict):
        return {k: _concrete(v) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_concrete(value.start), _concrete(value.stop), _concrete(value.step))
    return value


@dataclass(frozen=True)
class _IntRow:
    """A Python sequence of ints (a ``torch.Size``) a tensor was built from, as one proxy."""

    proxy: ConcreteProxy


def _int_values(value: Any) -> Any:
    """The ints (proxies of ints, int sequences) ``value`` is made of, or ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, ConcreteProxy):
        concrete = value.concrete
        if value.tainted or isinstance(concrete, bool):
            return None
        if isinstance(concrete, int):
            return value
        if isinstance(concrete, (tuple, list)) and all(type(v) is int for v in concrete):
            return _IntRow(value)
        return None
    if isinstance(value, (tuple, list)):
        items = [_int_values(v) for v in value]
        return None if any(item is None for item in items) else items
    return None


def _int_source(target: Any, args: tuple, kwargs: dict, value: Any) -> Any:
    """What an integer tensor was built from, when it holds exactly those Python ints:
    ``torch.tensor(ints)``, ``torch.as_tensor(ints)``, ``torch.stack`` of such tensors, an
    item of one (``seq_lens[0]``)."""
    if not isinstance(value, torch.Tensor) or is_fake(value) or value.is_floating_point() or value.is_complex() \
            or value.dtype == torch.bool:
        return None
    if target in _TENSOR_FROM_DATA and len(args) == 1:
        source = _int_values(args[0])
    elif target is operator.getitem and isinstance(args[0], ConcreteProxy) and isinstance(args[0].ints, list) \
            and type(args[1]) is int and -len(args[0].ints) <= args[1] < len(args[0].ints):
        source = args[0].ints[args[1]]
    elif target is torch.stack and isinstance(args[0], (tuple, list)) and len(args) + len(kwargs) == 1 \
            and all(isinstance(p, ConcreteProxy) and p.ints is not None for p in args[0]):
        source = [p.ints for p in args[0]]
    else:
        return None
    return source if _ints_concrete(source) == value.tolist() else None


def _holds_its_ints(proxy: Any) -> bool:
    """Whether ``proxy`` is a tensor built from ints that (still) holds them."""
    return isinstance(proxy, ConcreteProxy) and proxy.ints is not None and not proxy.tainted \
        and _ints_concrete(proxy.ints) == proxy.concrete.tolist()


def _ints_concrete(source: Any) -> Any:
    if isinstance(source, _IntRow):
        return list(source.proxy.concrete)
    if isinstance(source, list):
        return [_ints_concrete(item) for item in source]
    return source.concrete if isinstance(source, ConcreteProxy) else source


def _expand_ints(source: Any) -> Any:
    """``.tolist()`` of a tensor built from ``source``: lists of int proxies, read from the
    sequences they came from (``u.shape[2:][0]``), their lengths guarded as shape."""
    if isinstance(source, _IntRow):
        return [source.proxy[i] for i in range(len(source.proxy))]
    if isinstance(source, list):
        return [_expand_ints(item) for item in source]
    return source


def _proxies(value: Any) -> Iterator[ConcreteProxy]:
    if isinstance(value, ConcreteProxy):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _proxies(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _proxies(v)
    elif isinstance(value, slice):
        yield from _proxies((value.start, value.stop, value.step))


@dataclass
class ModuleCall:
    """One call of a traced-through (non-leaf) module, for the matcher."""

    qualname: str
    module: nn.Module
    args: tuple
    kwargs: dict
    output: Any = None
    depth: int = 0
    index: int = 0
    nodes: list = field(default_factory=list)
    template: "ModuleCall | None" = None  # the traced call this one replays


@dataclass
class Template:
    """A traced module call that identical later calls replay instead of re-executing."""

    call: ModuleCall
    traced_modules: list[str]
    leaf_calls: dict[str, list[str]]
    notes: int
    attributes_read: list[tuple[str, str]]
    concretised: list["Concretisation"] = field(default_factory=list)  # decisions taken inside the call
    # Per node, what a copy at another path needs (see ``_copy_plan``): found at the first replay.
    plan: list | None = None


@dataclass
class Concretisation:
    """One value Python took from the example: the node it came from and how it was read.

    ``convert`` names the conversion (see :data:`surgery.tracing.guards.CONVERSIONS`), so a
    call with new input shapes can re-derive the value from the same node and compare.
    """

    node: fx.Node
    convert: str
    value: Any
    guard: Guard


@dataclass
class Trace:
    """The result of tracing one call."""

    graph: fx.Graph
    root_node: fx.Node
    inputs: dict[str, fx.Node]
    calls: list[ModuleCall]
    deps: set
    notes: list[Guard]
    traced_modules: list[str]
    leaf_calls: dict[str, list[str]]
    seconds: float
    concretised: list[Concretisation] = field(default_factory=list)


def user_frame() -> tuple[str, int, str]:
    """The innermost frame outside torch and surgery: the model code being traced."""
    for frame_info in reversed(traceback.extract_stack()[:-1]):
        filename = os.path.abspath(frame_info.filename)
        if not filename.startswith(_ENGINE_DIRS) and "/contextlib.py" not in filename:
            return filename, frame_info.lineno or 0, (frame_info.line or "").strip()
    return "<unknown>", 0, ""


def _short(filename: str) -> str:
    cwd = os.getcwd()
    return os.path.relpath(filename, cwd) if filename.startswith(cwd) else filename


class ExampleTracer(fx.Tracer):
    """Traces ``root.forward`` on example inputs; see the module docstring."""

    def __init__(self, policy: TracePolicy, graph: fx.Graph | None = None) -> None:
        super().__init__(autowrap_modules=(math,))
        self.policy = policy
        self.graph = graph if graph is not None else fx.Graph()
        self._concrete_depth = 0
        self.calls: list[ModuleCall] = []
        self.deps: set = set()
        self.notes: list[Guard] = []
        self.traced_modules: list[str] = []
        self.leaf_calls: dict[str, list[str]] = {}
        self._param_names: dict[int, str] = {}
        self._param_proxies: dict[str, ConcreteProxy] = {}
        self._leaf_stack: list[str] = []
        # Objects inside the example's caches, and the leaf decision for each module
        # being called (it depends on what the call hands the module).
        self.cache_values = CacheValues()
        self._cache_inputs: set[str] = set()  # the names of the example call's caches
        self._leaf_decisions: dict[int, bool] = {}
        self._leaf_names: set[str] = set()
        self._failed_eagerly = False
        self._created: list[fx.Node] = []
        self._templates: dict[tuple, Template] = {}
        self._object_attrs: dict[int, str] = {}
        self.concretised: list[Concretisation] = []
        # Plain module attributes the traced code read, as (module path, name): guards.
        self.attributes_read: list[tuple[str, str]] = []
        self._watched_modules: list[nn.Module] | None = None
        self._watch_names: dict[tuple[type, tuple[str, ...]], list[str]] = {}
        self.fake_mode = None

    # ----- proxies -----------------------------------------------------------------
    def proxy(self, node: fx.Node) -> ConcreteProxy:
        return ConcreteProxy(node, self)

    @contextmanager
    def concrete_mode(self) -> Iterator[None]:
        self._concrete_depth += 1
        try:
            yield
        except Exception:
            # The example values themselves failed (an op, a leaf, a helper run eagerly):
            # making something a leaf cannot help, which the explanation must know.
            self._failed_eagerly = True
            raise
        finally:
            self._concrete_depth -= 1

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):  # noqa: D401 - fx signature
        if kind == "call_method" and target == "item" and _holds_its_ints(args[0]) \
                and isinstance(args[0].ints, (int, ConcreteProxy)):
            return args[0].ints  # the int the tensor was built from: graph arithmetic, no constant
        if kind == "call_method" and target in _CONCRETISING_METHODS:
            receiver = args[0]
            value = getattr(receiver.concrete, target)(*_concrete(args[1:]), **_concrete(kwargs))
            return self.concretise(receiver, value, f".{target}()", target)
        if kind == "call_method" and target == "tolist" and isinstance(args[0], ConcreteProxy) and not args[0].tainted:
            if _holds_its_ints(args[0]):
                # The ints the tensor was built from: no tensor-to-Python conversion in the
                # graph, which would split a compiled graph (dynamo cannot trace it).
                return _expand_ints(args[0].ints)
            return self._symbolic_list(super().create_proxy(kind, target, args, kwargs, name, type_expr), args)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr)
        if kind == "placeholder":
            return proxy
        cargs, ckwargs = _concrete(args), _concrete(kwargs)
        with self.concrete_mode():
            if kind == "call_function":
                value = run_factory(self.fake_mode, target, cargs, ckwargs) if id(target) in _FACTORY_IDS \
                    else target(*cargs, **ckwargs)
            elif kind == "call_method":
                value = getattr(cargs[0], target)(*cargs[1:], **ckwargs)
            elif kind == "call_module":
                value = self._run_leaf(target, cargs, ckwargs)
            elif kind == "get_attr":
                value = fetch_attribute(self.root, target)
            else:
                value = _MISSING
        self._propagate(proxy, kind, target, args, kwargs, value)
        if kind == "call_function" and not proxy.tainted:
            proxy.ints = _int_source(target, args, kwargs, value)
        if args and isinstance(args[0], ConcreteProxy) and (target is operator.setitem or (
                kind == "call_method" and target.endswith("_"))):
            args[0].ints = None  # written in place: no longer what it was built from
        return proxy

    def _symbolic_list(self, proxy: ConcreteProxy, args: tuple) -> Any:
        """``.tolist()`` of a shape-derived tensor: Python lists of proxies, not constants.

        Only the nesting (the tensor's shape) is guarded, so ``view(*grid)`` and
        ``math.prod(grid)`` stay graph arithmetic and a new resolution needs no new trace.
        """
        value = args[0].concrete.tolist()
        self._propagate(proxy, "call_method", "tolist", args, {}, value)
        self.concretise(proxy, structure(value), ".tolist() nesting", "structure")

        def expand(item: ConcreteProxy, concrete: Any) -> Any:
            if not isinstance(concrete, list):
                return item
            return [expand(item[i], element) for i, element in enumerate(concrete)]

        return expand(proxy, value)

    def _run_leaf(self, target: str, args: tuple, kwargs: dict) -> Any:
        module = self.root.get_submodule(target)
        self._leaf_stack.append(target)
        try:
            return _orig_module_call(module, *args, **kwargs)
        finally:
            self._leaf_stack.pop()

    def _propagate(self, proxy: ConcreteProxy, kind: str, target: Any, args: tuple,
                   kwargs: dict, value: Any) -> None:
        inputs = list(_proxies((args, kwargs)))
        proxy.concrete = value
        proxy.node.meta["example_value"] = value
        if kind == "get_attr":
            proxy.tainted = isinstance(value, torch.Tensor)
            proxy.meta_deps = frozenset({("param", target, "meta")})
            return
        if kind == "call_module":
            # A leaf's output shape is taken to follow its tensor inputs' shapes only; scalar
            # inputs (cache positions) would otherwise pin every call to one position.
            proxy.tainted = True
            proxy.meta_deps = frozenset().union(*(p.meta_deps for p in inputs if isinstance(p.concrete, torch.Tensor))) \
                if inputs else frozenset()
            return
        deps = frozenset().union(*(p.deps for p in inputs)) if inputs else frozenset()
        meta_deps = frozenset().union(*(p.meta_deps for p in inputs)) if inputs else frozenset()
        reads_meta = (kind == "call_function" and target is getattr and args[1] in _META_ATTRS) or (
            kind == "call_method" and target in _META_METHODS)
        if reads_meta:
            proxy.tainted = False
            proxy.deps = deps | meta_deps
            proxy.meta_deps = meta_deps
            return
        proxy.tainted = any(p.tainted for p in inputs)
        proxy.deps = deps
        proxy.meta_deps = meta_deps | deps
        container = args[0] if args else None
        if (kind == "call_function" and target is operator.getitem and isinstance(container, ConcreteProxy)
                and container.path is not None and type(args[1]) in (int, str)
                and not isinstance(container.concrete, torch.Tensor)):
            # Only int and str keys extend a path: paths are hashed into guards, and an index
            # such as ``[:, None]`` is tensor indexing, not a container item.
            self._child_of_container(proxy, container.path + (args[1],), value)

    def _child_of_container(self, proxy: ConcreteProxy, path: tuple, value: Any) -> None:
        proxy.path = path
        if isinstance(value, torch.Tensor):
            proxy.tainted, proxy.deps = True, frozenset()
            proxy.meta_deps = frozenset({("input", path, "meta")})
        elif isinstance(value, (list, tuple, dict)):
            proxy.tainted, proxy.deps, proxy.meta_deps = False, frozenset(), frozenset()
        else:
            proxy.tainted = False
            proxy.deps = frozenset({("input", path, "value")})
            proxy.meta_deps = proxy.deps

    def input_proxy(self, name: str, value: Any) -> ConcreteProxy:
        """A placeholder for one top-level input, with its example value."""
        if value is not None and (name in self.policy.cache_arguments or is_cache_value(value)):
            # A cache input: its objects are recognised wherever the model passes them on.
            self.policy = self.policy.for_example({name: value})
            self.cache_values.add(value)
            self._cache_inputs.add(name)
        proxy = self.create_proxy("placeholder", name, (), {})
        proxy.concrete = value
        proxy.node.meta["example_value"] = value
        proxy.path = (name,)
        if isinstance(value, torch.Tensor):
            proxy.tainted = True
            proxy.meta_deps = frozenset({("input", (name,), "meta")})
        elif isinstance(value, (list, tuple, dict)):
            proxy.tainted = False
        else:
            proxy.tainted = False
            proxy.deps = frozenset({("input", (name,), "value")})
            proxy.meta_deps = proxy.deps
        return proxy

    # ----- where Python needs a value --------------------------------------------------
    def concretise(self, proxy: ConcreteProxy, value: Any, how: str, convert: str) -> Any:
        filename, lineno, line = user_frame()
        where = f"{_short(filename)}:{lineno}"
        if proxy.tainted:
            owner = self._owner()
            problem = (f"data-dependent control flow at {where}: `{line}` needs {how} of a value computed "
                       f"from tensor data, which a graph cannot specialise on")
            if owner is None:
                raise TraceError(problem + " (in the model's top-level code)",
                                 "compute that value before calling the model and pass it in as a Python number "
                                 "(each new value then gets its own graph)")
            raise TraceError(problem, _leaf_fix(owner))
        deps = proxy.deps
        self.deps |= deps
        kind = "input" if any(d[2] == "value" for d in deps) else (
            "shape" if any(d[0] == "input" for d in deps) else "state")
        shown = value if not isinstance(value, (list, tuple)) or len(value) <= 8 else f"{type(value).__name__}[{len(value)}]"
        guard = Guard(kind, line or how, repr(shown), where)
        self.notes.append(guard)
        self.concretised.append(Concretisation(proxy.node, convert, value, guard))
        return value

    def concretise_length(self, proxy: ConcreteProxy) -> int:
        """``len()``: a tensor's length is shape, a container input's is guarded directly."""
        value = len(proxy.concrete)
        if isinstance(proxy.concrete, torch.Tensor) or (
                proxy.path is None and proxy.tainted and isinstance(proxy.concrete, (list, tuple))):
            # A tensor's length, or the length of the list an op returned (``chunk``,
            # ``unbind``, ``tolist``), follows from its inputs' shapes.
            extra = proxy.meta_deps
        elif proxy.path is not None:
            extra = frozenset({("input", proxy.path, "len")})
        else:
            return self.concretise(proxy, value, "len()", "len")
        filename, lineno, line = user_frame()
        self.deps |= extra
        guard = Guard("shape", line or "len()", repr(value), f"{_short(filename)}:{lineno}")
        self.notes.append(guard)
        self.concretised.append(Concretisation(proxy.node, "len", value, guard))
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.concretise(obj, bool(obj.concrete), "a truth value", "bool")

    def iter(self, obj: fx.Proxy) -> Iterator:
        length = self.concretise_length(obj)
        return iter([obj[i] for i in range(length)])

    def keys(self, obj: fx.Proxy) -> Any:
        return list(obj.concrete.keys())

    def _owner(self) -> str | None:
        """The innermost module being traced through (``None``: the model's top-level code).

        A leaf on the stack is skipped: it already runs eagerly, so making it a leaf fixes nothing.
        """
        for qualname, _ in reversed(self.module_stack.values()):
            if qualname and qualname not in self._leaf_names:
                return qualname
        return None

    def _failing_leaf(self) -> str | None:
        """The leaf whose eager run raised, when the innermost module on the stack is one."""
        if not self.module_stack:
            return None
        qualname, _ = next(reversed(self.module_stack.values()))
        return qualname if qualname in self._leaf_names else None

    # ----- modules and attributes ----------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        decided = self._leaf_decisions.get(id(m))
        return decided if decided is not None else self.policy.is_leaf(m, module_qualified_name)

    def _decide_leaf(self, m: nn.Module, qualname: str, args: tuple, kwargs: dict) -> bool:
        """Leaf or not for this call: by role, and by whether the call hands ``m`` cache state."""
        args, kwargs = _concrete(args), _concrete(kwargs)
        receives = self.cache_values.within((*args, *kwargs.values()))
        cache_free = not receives and self.policy.cache_free(m, args, kwargs, self._cache_inputs)
        leaf = self.policy.is_leaf(m, qualname, receives_cache=receives, cache_free=cache_free)
        self._leaf_decisions[id(m)] = leaf
        if leaf:
            self._leaf_names.add(qualname)
        return leaf

    def call_module(self, m, forward, args, kwargs):
        if self._concrete_depth:
            if self._leaf_stack:
                self.leaf_calls.setdefault(self._leaf_stack[-1], []).append(self.path_of_module(m))
            return forward(*args, **kwargs)
        qualname = self.path_of_module(m)
        if self._decide_leaf(m, qualname, args, kwargs):
            return _structured(super().call_module(m, forward, args, kwargs))
        key = replay_key(m, args, kwargs)
        template = self._templates.get(key) if key is not None else None
        if template is not None:
            return self._replay(template, m, qualname, args, kwargs)
        call = ModuleCall(qualname, m, args, kwargs, depth=len(self.module_stack), index=len(self.calls))
        self.calls.append(call)
        if qualname not in self.traced_modules:
            self.traced_modules.append(qualname)
        start, deps_before = len(self._created), set(self.deps)
        leaf_before = {k: len(v) for k, v in self.leaf_calls.items()}
        notes_before, concretised_before = len(self.notes), len(self.concretised)
        read_before = len(self.attributes_read)
        call.output = super().call_module(m, forward, args, kwargs)
        call.nodes = self._created[start:]
        if key is not None and all(len(d[1]) == 1 for d in self.deps - deps_before if d[0] == "input"):
            # Pure in its inputs' metadata: later identical calls replay this subgraph.
            self._templates[key] = Template(call, self.traced_modules[:],
                                            {k: v[leaf_before.get(k, 0):] for k, v in self.leaf_calls.items()},
                                            len(self.notes) - notes_before,
                                            self.attributes_read[read_before:], self.concretised[concretised_before:])
        return call.output

    @property
    def created_nodes(self) -> list[fx.Node]:
        """Every node this tracer put in its graph, in creation order (erased ones too)."""
        return self._created

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        self._created.append(node)
        return node

    def _replay(self, template: "Template", module: nn.Module, qualname: str, args: tuple, kwargs: dict) -> Any:
        """Copy a template call's subgraph for an identical module at another path."""
        source = template.call
        env: dict[fx.Node, fx.Node] = {}
        for old, new in zip(_proxies((source.args, source.kwargs)), _proxies((args, kwargs))):
            env[old.node] = new.node
        old_prefix, new_prefix = source.qualname + ".", qualname + "."

        def retarget(target: Any) -> Any:
            if isinstance(target, str) and target.startswith(old_prefix):
                return new_prefix + target[len(old_prefix):]
            return target

        if template.plan is None:
            template.plan = _copy_plan(source)
        new_name = qualname.replace(".", "_") + "_"
        create = functools.partial(_copy_node, self.graph)
        created, lookup = self._created, env.get
        for node, name, target, stack in template.plan:
            copy_ = create(node.op, node.target if target is None else new_prefix + target,
                           fx.node.map_arg(node.args, lambda n: lookup(n, n)),
                           fx.node.map_arg(node.kwargs, lambda n: lookup(n, n)), new_name + name, node.type)
            copy_.meta = dict(node.meta)
            if stack is not None:
                copy_.meta["nn_module_stack"] = {
                    (qualname + key if moved else key): (
                        (qualname + value[0],) + value[1] if value_moved else value)
                    for key, moved, value, value_moved in stack}
            created.append(copy_)
            env[node] = copy_
        call = ModuleCall(qualname, module, args, kwargs, depth=len(self.module_stack), index=len(self.calls),
                          template=source.template or source)
        call.nodes = [env[n] for n in source.nodes]
        # The copy repeats the template's decisions, right for its inputs' traced metadata:
        # recorded on the copy's nodes, a call with new shapes re-derives them for it too.
        self.concretised += [dataclasses.replace(item, node=env.get(item.node, item.node))
                             for item in template.concretised]
        call.output = _map_proxies(source.output, lambda p: _clone_proxy(p, env.get(p.node, p.node), self))
        self.calls.append(call)
        for name in template.traced_modules:
            renamed = retarget(name + ".")[:-1] if name != source.qualname else qualname
            if (name == source.qualname or name.startswith(old_prefix)) and renamed not in self.traced_modules:
                self.traced_modules.append(renamed)
        for leaf, used in template.leaf_calls.items():
            if leaf.startswith(old_prefix):
                self.leaf_calls.setdefault(retarget(leaf), []).extend(retarget(u) for u in used)
        self.attributes_read += [(_retarget_path(path, source.qualname, qualname), attr)
                                 for path, attr in template.attributes_read]
        return call.output

    def create_arg(self, a: Any) -> Any:
        # Objects held as plain module attributes (a block mask, a config) are read live by
        # the generated code instead of being frozen into the graph.
        path = self._object_attrs.get(id(a)) if not isinstance(a, (bool, int, float, str, type(None))) else None
        if path is not None and not isinstance(a, (torch.Tensor, nn.Module)):
            return self.create_node("get_attr", path, (), {})
        if isinstance(a, dict) and dataclasses.is_dataclass(a):
            # A dataclass that is also a mapping (a diffusers or transformers model output) is
            # rebuilt by its class, as fx rebuilds other dataclasses; fx would make it a dict.
            return self.create_node("call_function", type(a), (), {
                f.name: self.create_arg(getattr(a, f.name)) for f in dataclasses.fields(a) if f.init})
        return super().create_arg(a)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._concrete_depth or not isinstance(attr_val, torch.Tensor):
            return attr_val
        name = self._param_names.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in self._param_proxies:
            self._param_proxies[name] = self.create_proxy("get_attr", name, (), {})
        return self._param_proxies[name]

    # ----- entry point ---------------------------------------------------------------
    def trace_call(self, root: nn.Module, inputs: dict[str, Any], call: Any, *,
                   opaque_helpers: bool = True) -> Trace:
        """Trace ``call(root_proxy, proxies)`` on ``root`` with example ``inputs``.

        ``call`` receives the root-placeholder proxy and a dict of input proxies (or the
        literal value for ``None`` inputs) and returns the traced function's output.
        """
        started = time.perf_counter()
        self.root = root
        self.fake_mode = fake_mode_of(root)
        self.submodule_paths = {mod: name for name, mod in root.named_modules()}
        self._param_names = tensor_names(root)
        self.tensor_attrs = {}
        _collect_tensor_attrs(root, [], self.tensor_attrs)
        self._object_attrs = _collect_object_attrs(root)
        root_proxy = self.create_proxy("placeholder", "root", (), {})
        root_proxy.concrete = root
        proxies = {name: (self.input_proxy(name, value) if value is not None else None)
                   for name, value in inputs.items()}
        self.root_proxy, self.input_proxies = root_proxy, proxies
        with self._helpers_opaque(root, root_proxy, enabled=opaque_helpers), self.patched(call):
            output = self.run(call, root_proxy, proxies)
            self.create_node("output", "output", (self.create_arg(output),), {})
        inputs_nodes = {n: p.node for n, p in proxies.items() if p is not None}
        return Trace(self.graph, root_proxy.node, inputs_nodes, self.calls, set(self.deps), list(self.notes),
                     list(self.traced_modules), dict(self.leaf_calls), time.perf_counter() - started,
                     self.concretised)

    @contextmanager
    def patched(self, fn: Any = None) -> Iterator[None]:
        """Intercept module calls, parameter reads and autowrapped functions."""
        with _new_patcher() as patcher, self._attributes_watched():
            # Positional-only: a model may pass keywords named ``mod`` or ``attr`` itself.
            def module_getattr(mod: nn.Module, attr: str, /) -> Any:
                return self._module_getattr(mod, attr)

            def module_call(mod: nn.Module, /, *args: Any, **kwargs: Any) -> Any:
                return self._module_call(mod, *args, **kwargs)

            patcher.patch_method(nn.Module, "__getattr__", module_getattr, deduplicate=False)
            patcher.patch_method(nn.Module, "__call__", module_call, deduplicate=False)
            for name in FACTORY_NAMES:
                # Factories bypass __torch_function__ (torch.tensor(shape_proxy)) or take no
                # proxy at all (torch.arange(n)); record them so the graph recreates them per
                # call instead of baking a trace-time tensor in.
                patcher.patch(torch.__dict__, name, self._recording(getattr(torch, name)))
            patcher.patch(torch.__dict__, "is_grad_enabled", lambda: self._grad_mode_read())
            _patch_wrapped_functions(patcher)
            self._patcher = patcher
            self._compiled_seen: set[int] = set()
            self._wrap_globals(getattr(fn, "__globals__", {}))
            for module in self._autowrap_search:
                _autowrap_check(patcher, module.__dict__, self._autowrap_function_ids)
            yield

    def _wrap_globals(self, namespace: dict) -> None:
        """Record calls of the functions in the model code's ``namespace``: autowrapped ones
        (``math``) and ``torch.compile``d ones, each as one node, as a leaf is."""
        _autowrap_check(self._patcher, namespace, self._autowrap_function_ids)
        if id(namespace) in self._compiled_seen:
            return
        self._compiled_seen.add(id(namespace))
        for name, value in list(namespace.items()):
            if is_compiled_function(value):
                self._patcher.patch(namespace, name, self._recording_compiled(value))

    def _recording_compiled(self, compiled: Any) -> Any:
        # A compiled function's Python (flex attention's checks and higher-order op) is no
        # model code: it runs on the example values, as the compiled call does at run time.
        target = compiled_call(compiled)

        def record(*args: Any, **kwargs: Any) -> Any:
            if self._concrete_depth or next(_proxies((args, kwargs)), None) is None:
                return compiled(*args, **kwargs)
            return _structured(self.create_proxy("call_function", target, args, kwargs))
        return record

    def _grad_mode_read(self) -> bool:
        """``torch.is_grad_enabled()`` read by model code (a gradient-checkpointing branch):
        the graph takes that branch, so the grad mode becomes a guard of the specialisation."""
        value = _is_grad_enabled()
        caller = os.path.abspath(sys._getframe(2).f_code.co_filename)  # past the patched lambda
        if not self._concrete_depth and not caller.startswith(_ENGINE_DIRS):
            filename, lineno, line = user_frame()
            self.deps.add(GRAD_MODE)
            self.notes.append(Guard("state", line or "torch.is_grad_enabled()", repr(value),
                                    f"{_short(filename)}:{lineno}"))
        return value

    def _recording(self, factory: Any) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            if self._concrete_depth:
                return run_factory(self.fake_mode, factory, args, kwargs)
            return self.create_proxy("call_function", factory, args, kwargs)
        return record

    def run(self, fn: Any, *args: Any) -> Any:
        """Call ``fn`` under tracing, turning fx limitations into one-line TraceErrors."""
        try:
            with compiled_code_runs_eagerly():
                return fn(*args)
        except TraceError:
            raise
        except Exception as error:  # an fx limitation inside model code
            raise self._explain(error) from error

    def _module_getattr(self, mod: nn.Module, attr: str) -> Any:
        hidden = mod.__dict__.get(_HIDDEN)
        if hidden is not None and attr in hidden:
            if not self._concrete_depth:  # (a leaf's own reads run again at every call)
                self.attributes_read.append((self.submodule_paths[mod], attr))
            return hidden[attr]
        return self.getattr(attr, _orig_module_getattr(mod, attr), {})

    @contextmanager
    def _attributes_watched(self) -> Iterator[None]:
        """Move the twin's watched plain attributes out of the modules' ``__dict__`` while
        tracing: each read then reaches ``nn.Module.__getattr__``, which records it, so only
        the attributes traced code reads become guards."""
        if self._watched_modules is None:  # built-in layers are leaves: their code runs eagerly
            self._watched_modules = [m for m in self.submodule_paths if not (_is_torch_builtin(m) or _is_peft_layer(m))]
        moved: list[tuple[nn.Module, dict[str, Any]]] = []
        for module in self._watched_modules:
            if _HIDDEN in module.__dict__:
                continue
            names = self._names_to_watch(module)
            if names:
                hidden = {attr: module.__dict__.pop(attr) for attr in names}
                module.__dict__[_HIDDEN] = hidden
                moved.append((module, hidden))
        try:
            yield
        finally:
            for module, hidden in moved:
                del module.__dict__[_HIDDEN]
                for attr, value in hidden.items():
                    module.__dict__.setdefault(attr, value)  # unless the model set it anew

    def _names_to_watch(self, module: nn.Module) -> list[str]:
        """The watched attributes in ``module.__dict__``: the same for every module of a class
        whose ``__dict__`` holds the same names, so found once per trace (a trace enters
        :meth:`patched` once per rule action: 64 times at 1.3B, over 168 modules each)."""
        key = (type(module), tuple(module.__dict__))
        names = self._watch_names.get(key)
        if names is None:
            names = self._watch_names[key] = [attr for attr in key[1] if watched(module, attr)]
        return names

    def _module_call(self, mod: nn.Module, /, *args: Any, **kwargs: Any) -> Any:
        def forward(*a: Any, **k: Any) -> Any:
            return _orig_module_call(mod, *a, **k)
        if not self._concrete_depth:
            self._wrap_globals(getattr(getattr(mod, "forward", mod), "__globals__", {}))
        return self.call_module(mod, forward, args, kwargs)

    @contextmanager
    def _helpers_opaque(self, root: nn.Module, root_proxy: ConcreteProxy, enabled: bool) -> Iterator[None]:
        patched: list[tuple[nn.Module, str]] = []
        if enabled:
            for qualname, module in root.named_modules():
                if qualname and self.policy.is_leaf(module, qualname):
                    continue
                for name in self.policy.helper_candidates(module, root=not qualname):
                    if name in module.__dict__:
                        continue
                    module.__dict__[name] = self._opaque_method(module, qualname, name, root_proxy)
                    patched.append((module, name))
        try:
            yield
        finally:
            for module, name in patched:
                module.__dict__.pop(name, None)

    def _opaque_method(self, module: nn.Module, qualname: str, name: str, root_proxy: ConcreteProxy):
        bound = getattr(type(module), name).__get__(module)
        tracer = self

        @functools.wraps(bound)  # the model may read the method's signature (``inspect.signature``)
        def call(*args: Any, **kwargs: Any) -> Any:
            if tracer._concrete_depth:
                return bound(*args, **kwargs)
            if tracer.policy.traced_through(module, name, _concrete(args), _concrete(kwargs),
                                            tracer.cache_values) is not False:
                return bound(*args, **kwargs)  # ordinary code, or the computation itself
            owner = root_proxy if not qualname else tracer.create_proxy("get_attr", qualname, (), {})
            node = tracer.create_node("call_method", name, tracer.create_arg((owner,) + args),
                                      tracer.create_arg(kwargs))
            proxy = ConcreteProxy(node, tracer)
            state = _module_state(module)
            with tracer.concrete_mode():
                value = bound(*_concrete(args), **_concrete(kwargs))
            proxy.concrete, proxy.tainted = value, True
            node.meta["example_value"] = value
            node.meta["opaque_helper"] = f"{qualname + '.' if qualname else ''}{name}"
            written = _written_state(module, state, qualname)
            if written:  # what it wrote on the example call (rule code reading these is not moved above it)
                node.meta["writes_state"] = written
            return _structured(proxy)

        return call

    def _explain(self, error: Exception) -> TraceError:
        frames = traceback.extract_tb(error.__traceback__)
        user = [f for f in frames if not os.path.abspath(f.filename).startswith(_ENGINE_DIRS)]
        frame = user[-1] if user else (frames[-1] if frames else None)
        where = f"{_short(os.path.abspath(frame.filename))}:{frame.lineno}" if frame else "<unknown>"
        line = (frame.line or "").strip() if frame else ""
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        cause = f"`{line}` at {where} ({type(error).__name__}: {message})"
        leaf = self._failing_leaf()
        if isinstance(error, _VALUE_ERRORS):
            place = f"in `{leaf}` (a leaf, run eagerly on example values)" if leaf else (
                f"in `{self._owner()}`" if self._owner() else "in the model's top-level code")
            return TraceError(
                f"`{line}` at {where} {place} needs the values of a tensor computed from the model's activations "
                f"({type(error).__name__}), which tracing does not compute: it runs the model without arithmetic",
                "express it with tensor operations so the graph computes it on every call (torch.where(condition, "
                "a, b) instead of an if, a tensor factor instead of float(...)), or compute it before calling the "
                "model and pass it in as a Python number")
        owner = self._owner()
        if leaf is not None or self._failed_eagerly:
            place = f"inside `{leaf}`, which runs eagerly as a leaf" if leaf else (
                f"in `{owner}`" if owner else "in the model's top-level code")
            return TraceError(
                f"running {cause} on the example values fails {place}",
                "the cause is unknown to surgery; run the model itself on the example inputs: if it fails the "
                "same way, fix the inputs; if not, that code needs something tracing cannot give it (real tensor "
                f"data, for numpy or a custom kernel); look at {where}")
        if owner is None:
            return TraceError(
                f"cannot trace {cause} in the model's top-level code",
                "the cause is unknown to surgery; run the model itself on the example inputs: if it fails the "
                f"same way, fix the inputs; if not, the construct at {where} is beyond the tracer: rewrite it "
                "or report it with that line")
        return TraceError(f"cannot trace {cause}",
                          _leaf_fix(owner) + "; if the model itself fails on the example inputs, fix the inputs")


#: Raised when model code needs tensor values (``.item()``, ``bool()``, a value-dependent
#: shape) of a fake example tensor: no trace-time fix, such as a leaf, can provide them.
_VALUE_ERRORS = (DataDependentOutputException, DynamicOutputShapeException)


def _leaf_fix(qualname: str) -> str:
    """A fix that makes ``qualname`` a leaf, written as the code that does it."""
    return (f"make `{qualname}` a leaf so it runs eagerly: rule = dataclasses.replace(rule, "
            f"trace_policy=rule.trace_policy.with_leaves('{qualname}')); if `{qualname}` holds structure the rule "
            "matches (a block, its attention or feed-forward), move the construct into a submodule of its own and "
            "make that the leaf instead")


def template_groups(calls: Iterable[ModuleCall]) -> list[list[ModuleCall]]:
    """Traced calls grouped by the template they are (or replay), in trace order."""
    groups: dict[int, list[ModuleCall]] = {}
    for call in calls:
        groups.setdefault(id(call.template or call), []).append(call)
    return list(groups.values())


def tensor_names(root: nn.Module) -> dict[int, str]:
    """Each parameter's and buffer's first qualified name (the one ``named_modules`` uses)."""
    names: dict[int, str] = {}
    for name, tensor in root.named_parameters(remove_duplicate=False):
        names.setdefault(id(tensor), name)
    for name, tensor in root.named_buffers(remove_duplicate=False):
        names.setdefault(id(tensor), name)
    return names


def _copy_node(graph: fx.Graph, op: str, target: Any, args: tuple, kwargs: dict, name: str, type_expr: Any) -> fx.Node:
    """``graph.create_node`` for a copy of a node whose arguments differ from the original's
    only in the nodes they name: fx's walk of the arguments for raw symbolic ints (which
    the original passed) would repeat on every copy, 40% of replaying at 1.3B. The node
    gets its arguments as ``fx.Node.__init__`` gives them, after it is created with none."""
    if graph.owning_module is not None or not hasattr(fx.Node, "_update_args_kwargs"):
        return graph.create_node(op, target, args, kwargs, name, type_expr)  # creation hooks see the arguments
    node = graph.create_node(op, target, (), {}, name, type_expr)
    node._update_args_kwargs(args or (), kwargs or fx.immutable_collections.immutable_dict())
    return node


def _copy_plan(call: ModuleCall) -> list[tuple]:
    """For each node of a traced call, what :meth:`ExampleTracer._replay` rewrites when it copies
    the node for the same module at another path, relative to that path: the name after the
    path's prefix, the ``call_module``/``get_attr`` target inside the module (``None``: kept),
    and the ``nn_module_stack`` entries (``None``: none), each as (key, key inside the module?,
    value, value's path inside the module?) with the part after the path where it is inside.

    Found once per template instead of once per copy (56 copies at 1.3B)."""
    old_name, old_prefix, old = call.qualname.replace(".", "_") + "_", call.qualname + ".", call.qualname

    def inside(path: str) -> str | None:
        if path == old:
            return ""
        return path[len(old):] if path.startswith(old_prefix) else None

    plan = []
    for node in call.nodes:
        # Names unique to each copy: fx's namer walks every taken ``getitem_<n>`` when
        # thirty copies all ask for the template's names (a fifth of an apply at 1.3B).
        name = node.name[len(old_name):] if node.name.startswith(old_name) else node.name
        target = None
        if node.op in ("call_module", "get_attr") and isinstance(node.target, str) \
                and node.target.startswith(old_prefix):
            target = node.target[len(old_prefix):]
        stack = node.meta.get("nn_module_stack")
        entries = None
        if stack:
            entries = []
            for key, value in stack.items():
                key_rest = inside(key)
                value_rest = inside(value[0]) if isinstance(value, tuple) and value and isinstance(value[0], str) \
                    else None
                entries.append((key if key_rest is None else key_rest, key_rest is not None,
                                value if value_rest is None else (value_rest, tuple(value[1:])),
                                value_rest is not None))
        plan.append((node, name, target, entries))
    return plan


def _retarget_path(path: str, old: str, new: str) -> str:
    if path == old:
        return new
    return new + path[len(old):] if path.startswith(old + ".") else path


def _map_proxies(value: Any, fn: Any) -> Any:
    if isinstance(value, ConcreteProxy):
        return fn(value)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_map_proxies(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_proxies(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_proxies(v, fn) for k, v in value.items()}
    return value


def _clone_proxy(proxy: ConcreteProxy, node: fx.Node, tracer: "ExampleTracer") -> ConcreteProxy:
    return ConcreteProxy(node, tracer, proxy.concrete, proxy.tainted, proxy.deps, proxy.meta_deps, None)


def _value_key(value: Any) -> Any:
    """What a module call's behaviour may depend on, for one argument value."""
    if isinstance(value, ConcreteProxy):
        return ("proxy", _value_key(value.concrete))
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex() or value.device.type == "meta" or is_fake(value):
            return ("t", tuple(value.shape), value.dtype, value.device.type)
        return ("i", tuple(value.shape), value.dtype, tuple(value.flatten().tolist()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_value_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _value_key(v)) for k, v in value.items()))
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype, torch.device)):
        return ("v", type(value).__name__, value)
    raise TypeError(type(value))


def module_key(module: nn.Module) -> tuple:
    """Structure, parameter metadata, simple attributes and per-instance code of a module tree."""
    parts = []
    for name, sub in module.named_modules():
        params = tuple((n, tuple(p.shape), p.dtype) for n, p in sub.named_parameters(recurse=False))
        plain = {**vars(sub), **vars(sub).get(_HIDDEN, {})}  # while tracing, too
        attrs = tuple((k, v) for k, v in plain.items()
                      if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None))))
        # Per-instance code (a patched forward, hooks) makes two same-class modules differ.
        code = tuple((k, id(v)) for k, v in plain.items() if callable(v) and not isinstance(v, nn.Module))
        hooks = tuple(id(h) for key in ("_forward_hooks", "_forward_pre_hooks")
                      for h in getattr(sub, key, {}).values())
        parts.append((name, type(sub), params, attrs, code, hooks))
    return tuple(parts)


def replay_key(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """Identical structure and identical argument metadata: the same traced subgraph."""
    try:
        return (module_key(module), _value_key(args), _value_key(kwargs))
    except TypeError:
        return None


def _structured(value: Any) -> Any:
    """Expand tuple and list outputs of opaque calls into Python containers of proxies.

    Model code branches on ``isinstance(result, tuple)`` and unpacks nested tuples; dicts
    and scalars stay single proxies because only opaque code reads them.
    """
    if isinstance(value, ConcreteProxy) and isinstance(value.concrete, (tuple, list)) \
            and not hasattr(value.concrete, "_fields"):
        items = [_structured(value[i]) for i in range(len(value.concrete))]
        for item in items:
            for p in _proxies(item):
                p.tainted = True
        return tuple(items) if isinstance(value.concrete, tuple) else items
    return value


def fetch_attribute(root: nn.Module, target: str) -> Any:
    """``root.a.b.c`` for ``target == "a.b.c"`` (plain attributes too, unlike ``get_submodule``)."""
    value: Any = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def _collect_tensor_attrs(module: nn.Module, prefix: list[str], out: dict) -> None:
    for key, value in module.__dict__.items():
        if isinstance(value, torch.Tensor) and not key.startswith("_"):
            out[value] = ".".join(prefix + [key])
    for key, child in module.named_children():
        _collect_tensor_attrs(child, prefix + [key], out)


def _collect_object_attrs(root: nn.Module) -> dict[int, str]:
    found: dict[int, str] = {}
    for qualname, module in root.named_modules():
        for key, value in vars(module).items():
            if key.startswith("_") or isinstance(value, (bool, int, float, str, type(None), tuple, list, dict,
                                                         torch.Tensor, torch.dtype, torch.device)):
                continue
            found.setdefault(id(value), f"{qualname}.{key}" if qualname else key)
    return found


def _module_state(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """``module``'s parameters and buffers by path, with their version counters."""
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    return {name: (tensor, tensor._version) for name, tensor in named}


def _written_state(module: nn.Module, before: dict[str, tuple[torch.Tensor, int]], qualname: str) -> tuple[str, ...]:
    """Paths (from the root) of ``module``'s parameters and buffers written in place or rebound since ``before``."""
    after = {name: tensor for name, (tensor, _) in _module_state(module).items()}
    prefix = qualname + "." if qualname else ""
    return tuple(prefix + name for name, (tensor, version) in before.items()
                 if after.get(name) is not tensor or tensor._version != version)
