"""Guards: what a specialised graph assumed about its inputs and its model.

The tracer resolves Python control flow from example values. Each resolution depends on
input properties (a tensor's shape, a scalar's value, a container's length) or on model
state (a parameter's device, a plain attribute's value). A :class:`GuardSet` records those
properties with their values; a call may reuse the graph only when all of them hold.

Input shapes are the exception. Shape arithmetic is recorded in the graph, so a graph
traced at one resolution is right at another unless a Python decision changes. For a call
whose shapes differ, the decisions themselves are re-derived on meta tensors
(:mod:`.recheck`) and compared, instead of assuming every shape change needs a new trace.
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

# A dependency names one property: ("input", path, kind), ("param", qualname, "meta") or
# GRAD_MODE (the model's code branched on ``torch.is_grad_enabled()``).
Dep = tuple
GRAD_MODE: Dep = ("grad", (), "value")


@dataclass(frozen=True)
class Guard:
    """One specialisation, for reports: where it was taken and what it assumed."""

    kind: str  # "input" | "shape" | "state"
    expr: str
    value: str
    where: str


def tensor_meta(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.device.type, t.device.index)


def tensor_kind(t: torch.Tensor) -> tuple:
    """Everything of a tensor's metadata except its sizes (those are checked by re-derivation)."""
    return (t.dim(), t.dtype, t.device.type, t.device.index)


def structure(value: Any) -> Any:
    """The nesting of a ``.tolist()`` result: list lengths, with the numbers left out."""
    if isinstance(value, list):
        return tuple(structure(v) for v in value)
    return None


#: How a traced node's value became the Python value the model's code branched on.
CONVERSIONS: dict[str, Callable[[Any], Any]] = {
    "bool": bool, "int": int, "float": float, "index": operator.index, "len": len,
    "item": lambda value: value.item(), "structure": structure,
}


@dataclass(frozen=True)
class Field:
    """A path step that reads an attribute (``cache.k`` of a dataclass or object cache)."""

    name: str


def resolve_path(inputs: dict[str, Any], path: tuple) -> Any:
    """The value at ``path``: an input name, then item keys (int, str) and :class:`Field` steps."""
    value = inputs[path[0]]
    for key in path[1:]:
        value = getattr(value, key.name) if isinstance(key, Field) else value[key]
    return value


def evaluate(dep: Dep, inputs: dict[str, Any], model: nn.Module) -> Any:
    """The current value of a dependency on these inputs and this model."""
    source, where, kind = dep
    if source == "grad":
        return torch.is_grad_enabled()
    if source == "param":
        value = model.get_parameter(where) if _has_param(model, where) else model.get_buffer(where)
    else:
        value = resolve_path(inputs, where)
    if kind == "meta":
        if not isinstance(value, torch.Tensor):
            return ("not-a-tensor", type(value))
        return tensor_meta(value) if source == "param" else tensor_kind(value)
    if kind == "len":
        return len(value)
    if kind == "value":
        return value if isinstance(value, (bool, int, float, str, type(None))) else ("object", type(value))
    raise ValueError(f"unknown guard kind {kind!r}")


def describe(dep: Dep) -> str:
    """A dependency as the user wrote it: ``torch.is_grad_enabled()``, ``cache[0]['k']``."""
    source, where, kind = dep
    if source == "grad":
        return "torch.is_grad_enabled()"
    if source == "param":
        return f"{where} ({kind})"
    steps = "".join(f".{key.name}" if isinstance(key, Field) else f"[{key!r}]" for key in where[1:])
    return f"{where[0]}{steps} ({kind})"


def _has_param(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


_SIMPLE = (bool, int, float, str, type(None), torch.dtype, torch.device)


def watched(module: nn.Module, attr: str) -> bool:
    """Whether the tracer sees each read of the plain attribute ``attr`` of a traced module
    (one that no class attribute shadows)."""
    return not attr.startswith("_") and attr != "training" and not _on_class(type(module), attr)


@lru_cache(maxsize=None)
def _on_class(cls: type, attr: str) -> bool:
    return hasattr(cls, attr)


def snapshot_state(model: nn.Module, qualnames: Iterable[str],
                   read: Iterable[tuple[str, str]] = ()) -> dict[tuple[str, str], Any]:
    """Plain attributes that traced code read: ``read``, as ``(module path, name)``, and of
    the modules whose Python code was traced (``qualnames``), those whose reads the tracer
    could not see (see :func:`watched`).

    Traced code bakes these values in (``self.block_mask``, ``self.local_attn_size``,
    ``self.freqs``), and pipelines change them at run time, so a change must re-specialise;
    an attribute the traced code never read (a cache-path setting of a module traced on its
    cache-free path) changes nothing. Simple values compare by equality, everything else by
    identity.
    """
    state: dict[tuple[str, str], Any] = {}
    for qualname in qualnames:
        module = model.get_submodule(qualname)
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr == "training" or watched(module, attr):
                continue
            state[(qualname, attr)] = _state_token(value)
    for qualname, attr in read:
        state[(qualname, attr)] = _state_token(model.get_submodule(qualname).__dict__.get(attr, _MISSING))
    return state


def _state_token(value: Any) -> Any:
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value):
        return (type(value), tuple(value))
    return ("id", id(value))


def shape_key(paths: Iterable[tuple], inputs: dict[str, Any]) -> tuple:
    return tuple(tuple(resolve_path(inputs, path).shape) for path in paths)


@dataclass
class GuardSet:
    """Everything a call must satisfy to reuse one specialised graph.

    ``shapes`` are the traced sizes of the inputs whose metadata Python read. A call with
    other sizes is accepted when ``recheck`` re-derives every decision unchanged (the
    accepted sizes are remembered).
    """

    signature: tuple
    deps: dict[Dep, Any] = field(default_factory=dict)
    state: dict[tuple[str, str], Any] = field(default_factory=dict)
    notes: list[Guard] = field(default_factory=list)
    shapes: dict[tuple, tuple] = field(default_factory=dict)
    recheck: Any = None  # a surgery.tracing.recheck.ShapeRecheck
    #: The ``module.compile()`` call of each traced-through module (``None``: not compiled).
    #: Generated code calls a compiled module as a module, so compiling or uncompiling one
    #: needs a new graph.
    compiled: dict[str, Any] = field(default_factory=dict)
    accepted: set = field(default_factory=set, repr=False, compare=False)
    rechecked: int = 0
    _grouped: dict | None = field(default=None, repr=False, compare=False)
    _unchanged: "UnchangedState | None" = field(default=None, repr=False, compare=False)

    def holds(self, signature: tuple, inputs: dict[str, Any], model: nn.Module) -> bool:
        return self.first_failure(signature, inputs, model) is None

    def first_failure(self, signature: tuple, inputs: dict[str, Any], model: nn.Module) -> str | None:
        """``None`` if every guard holds, else a short description of the first that fails."""
        if signature != self.signature:
            for got, want in zip(signature, self.signature):
                if got != want:
                    return f"input {got[0]}: {got[1]} != {want[1]}"
            return f"inputs {[s[0] for s in signature]} != {[s[0] for s in self.signature]}"
        for dep, expected in self.deps.items():
            try:
                actual = evaluate(dep, inputs, model)
            except (KeyError, IndexError, TypeError, AttributeError) as error:
                return f"{dep}: {type(error).__name__}"
            if actual != expected:
                return f"{describe(dep)}: {actual!r} != {expected!r}"
        failure = self._state_failure(model)
        return failure if failure is not None else self._shapes_failure(inputs)

    def _state_failure(self, model: nn.Module) -> str | None:
        if self._unchanged is not None and self._unchanged.holds(model):
            return None
        for qualname, attrs in self.state_by_module.items():
            try:
                module = model.get_submodule(qualname)
            except AttributeError:
                return f"module {qualname} is gone"
            values = module.__dict__
            for attr, expected in attrs:
                actual = _state_token(values.get(attr, _MISSING))
                if actual != expected:
                    return f"{qualname or '<root>'}.{attr}: {actual!r} != {expected!r}"
        for qualname, expected in self.compiled.items():
            try:
                actual = compiled_call(model.get_submodule(qualname))
            except AttributeError:
                return f"module {qualname} is gone"
            if actual is not expected:
                return f"{qualname} was {'compiled' if actual is not None else 'uncompiled'} since its graph was built"
        self._unchanged = UnchangedState(model, self.state_by_module, self.compiled)
        return None

    def _shapes_failure(self, inputs: dict[str, Any]) -> str | None:
        if not self.shapes:
            return None
        try:
            key = shape_key(self.shapes, inputs)
        except (KeyError, IndexError, TypeError, AttributeError) as error:
            return f"input shapes: {type(error).__name__}"
        if key == tuple(self.shapes.values()) or key in self.accepted:
            return None
        if self.recheck is None:
            return f"input shapes {key} != {tuple(self.shapes.values())}"
        failure = self.recheck.first_failure(inputs)
        if failure is None:
            self.accepted.add(key)
            self.rechecked += 1
        return failure

    @property
    def state_by_module(self) -> dict[str, list[tuple[str, Any]]]:
        if self._grouped is None:
            grouped: dict[str, list[tuple[str, Any]]] = {}
            for (qualname, attr), expected in self.state.items():
                grouped.setdefault(qualname, []).append((attr, expected))
            self._grouped = grouped
        return self._grouped


_MISSING = object()
_COMPILED = "_compiled_call_impl"  # where nn.Module.compile() keeps the compiled call
_compiled_of = operator.methodcaller("get", _COMPILED)  # of a module's __dict__, in C


def compiled_call(module: nn.Module) -> Any:
    """The module's ``module.compile()`` result, or ``None``."""
    return module.__dict__.get(_COMPILED)


def snapshot_compiled(model: nn.Module, qualnames: Iterable[str]) -> dict[str, Any]:
    """The compiled call (or ``None``) of each of ``qualnames`` but the root (see ``GuardSet.compiled``)."""
    return {qualname: compiled_call(model.get_submodule(qualname)) for qualname in qualnames if qualname}


class UnchangedState:
    """A snapshot that proves, by identity alone, that the checked state has not changed.

    Comparing every traced module's plain attributes by value costs milliseconds per call
    at full model size (hundreds of modules). After a full check passes, this keeps the
    module objects (and each parent-to-child link, so a swapped submodule is seen) and the
    attribute objects themselves: if the same objects are still in place the values are
    the same. Any difference, even an equal value in a new object, falls back to the full
    check, which then takes a new snapshot.
    """

    def __init__(self, model: nn.Module, state_by_module: dict[str, list[tuple[str, Any]]],
                 compiled: dict[str, Any] | None = None) -> None:
        self.model = weakref.ref(model)
        links: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
        self.attributes: list[tuple[nn.Module, Callable[[dict], tuple], tuple]] = []

        def walk(qualname: str) -> nn.Module:
            module = model
            for atom in qualname.split(".") if qualname else ():
                child = module._modules[atom]
                links[(id(module), atom)] = (module, atom, child)
                module = child
            return module

        for qualname, attrs in state_by_module.items():
            module = walk(qualname)
            names = [attr for attr, _ in attrs]
            getter = _getter(names)
            self.attributes.append((module, getter, getter(_with_missing(module.__dict__, names))))
        compiled = compiled or {}
        # Compiled or not, as the full check saw it: one C-level pass over the modules' dicts.
        self.compiled_dicts = [walk(qualname).__dict__ for qualname in compiled]
        self.compiled = tuple(compiled.values())
        self.none_compiled = all(value is None for value in self.compiled)
        self.links = list(links.values())

    def holds(self, model: nn.Module) -> bool:
        if self.model() is not model:
            return False
        for parent, name, child in self.links:
            if parent._modules.get(name) is not child:
                return False
        for module, getter, objects in self.attributes:
            try:
                current = getter(module.__dict__)
            except KeyError:
                return False
            if not all(map(operator.is_, current, objects)):
                return False
        if self.none_compiled:
            return not any(map(_compiled_of, self.compiled_dicts))
        return all(map(operator.is_, map(_compiled_of, self.compiled_dicts), self.compiled))


def _getter(names: list[str]) -> Callable[[dict], tuple]:
    if len(names) == 1:
        name = names[0]
        return lambda values: (values[name],)
    return operator.itemgetter(*names) if names else (lambda values: ())


def _with_missing(values: dict, names: list[str]) -> dict:
    # An attribute the full check saw as missing must stay missing; a sentinel object stands in.
    return {name: values.get(name, _MISSING) for name in names}
