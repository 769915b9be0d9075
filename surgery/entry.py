"""Checks a call of the rewritten model against the base model's entry point, before any trace.

A call the base model would refuse (an unknown keyword, a missing argument, a latent the
stream's embedder cannot take, a tensor on ``meta``) must fail with one line naming the
problem, not deep inside a trace with advice about leaves. And the rule's own checks need
the latent however it was passed: positionally or by keyword (``x=``).

The entry point is ``forward``'s signature or, for the common ``forward(self, *args,
**kwargs)`` that passes everything on to ``self._forward_inference(*args, **kwargs)``, the
signatures of the methods it passes on to (read from its source). A ``forward`` that uses its
``*args``/``**kwargs`` any other way is *open*: every keyword is accepted, and the latent is
found by the name it had in the example call.
"""
from __future__ import annotations

import ast
import difflib
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from .errors import CallError

_ENTRIES: dict[type, "EntryPoint"] = {}
#: How deep ``forward -> _forward_inference -> ...`` pass-through chains are followed.
_DEPTH = 3
_KWARGS_READERS = ("get", "pop", "setdefault")


class EntryPoint:
    """How a call binds to ``base_cls.forward``: the accepted parameters, by call form."""

    def __init__(self, owner: str, targets: list[tuple[str, inspect.Signature]], read: Iterable[str],
                 open_: bool) -> None:
        self.owner = owner
        self.targets = targets
        self.open = open_
        names: dict[str, None] = {}
        for _, signature in targets:
            names.update((p.name, None) for p in signature.parameters.values()
                         if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        names.update((name, None) for name in read)
        self.accepted = tuple(names)
        self._forms: dict[tuple[int, tuple[str, ...]], dict[str, str]] = {}

    @classmethod
    def of(cls, base_cls: type) -> "EntryPoint":
        if base_cls not in _ENTRIES:
            targets, read, open_ = _resolve(base_cls, base_cls.forward, _DEPTH)
            _ENTRIES[base_cls] = cls(f"{base_cls.__name__}.forward", targets, read, open_)
        return _ENTRIES[base_cls]

    def form(self, positional: int, keywords: tuple[str, ...], extra: Iterable[str] = ()) -> dict[str, str]:
        """Parameter name -> input key (``arg0`` or the keyword) for this call form.

        Raises:
            CallError: the form fits none of the entry point's signatures.
        """
        key = (positional, keywords)
        known = self._forms.get(key)
        if known is not None:
            return known
        if self.open:
            found = {name: name for name in keywords}
        else:
            found = self._bind(positional, keywords, tuple(extra))
        if len(self._forms) < 64:  # a handful of forms per model; bounded against misuse
            self._forms[key] = found
        return found

    def _bind(self, positional: int, keywords: tuple[str, ...], extra: tuple[str, ...]) -> dict[str, str]:
        unknown = [k for k in keywords if k not in self.accepted]
        if unknown:
            known = list(self.accepted) + [e for e in extra if e not in self.accepted]
            close = difflib.get_close_matches(unknown[0], known, n=1)
            raise CallError(f"{self.owner}() got an unknown keyword argument '{unknown[0]}'; "
                            f"it accepts {', '.join(known)}",
                            f"did you mean '{close[0]}'?" if close else "check the spelling of the keyword")
        placeholders = [f"arg{i}" for i in range(positional)]
        failures = []
        for name, signature in self.targets:
            try:
                bound = signature.bind(*placeholders, **{k: k for k in keywords})
            except TypeError as error:
                failures.append(f"{name}{signature}: {error}")
                continue
            return {param: value for param, value in bound.arguments.items() if isinstance(value, str)}
        raise CallError(f"the call ({positional} positional, keywords {', '.join(keywords) or 'none'}) fits no "
                        f"signature of {self.owner}: {'; '.join(failures)}",
                        "pass the arguments the base model takes")


def _resolve(cls: type, fn: Any, depth: int) -> tuple[list[tuple[str, inspect.Signature]], set[str], bool]:
    """(qualname, signature without ``self``) of each target, keywords ``forward`` reads, open?"""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return [], set(), True
    params = list(signature.parameters.values())[1:]
    own = signature.replace(parameters=params)
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL not in kinds and inspect.Parameter.VAR_KEYWORD not in kinds:
        return [(fn.__qualname__, own)], set(), False
    if depth == 0 or kinds != [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]:
        return [], set(), True
    passes = _pass_through(fn, params[0].name, params[1].name)
    if passes is None:
        return [], set(), True
    methods, read = passes
    targets: list[tuple[str, inspect.Signature]] = []
    for method in methods:
        target = inspect.getattr_static(cls, method, None)
        if not inspect.isfunction(target):
            return [], set(), True
        found, more, open_ = _resolve(cls, target, depth - 1)
        if open_:
            return [], set(), True
        targets.extend(found)
        read |= more
    return targets, read, not targets


def _pass_through(fn: Any, args_name: str, kwargs_name: str) -> tuple[list[str], set[str]] | None:
    """The ``self.<method>(*args, **kwargs)`` calls of ``fn`` and the keys it reads from kwargs;
    ``None`` when ``fn`` uses its ``*args``/``**kwargs`` any other way."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    allowed: set[int] = set()
    methods: list[str] = []
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self"
                    and len(node.args) == 1 and isinstance(node.args[0], ast.Starred)
                    and _is_name(node.args[0].value, args_name) and len(node.keywords) == 1
                    and node.keywords[0].arg is None and _is_name(node.keywords[0].value, kwargs_name)):
                methods.append(func.attr)
                allowed.update({id(node.args[0].value), id(node.keywords[0].value)})
            elif (isinstance(func, ast.Attribute) and _is_name(func.value, kwargs_name)
                  and func.attr in _KWARGS_READERS and node.args and _constant_str(node.args[0])):
                read.add(node.args[0].value)
                allowed.add(id(func.value))
        elif isinstance(node, ast.Subscript) and _is_name(node.value, kwargs_name) and _constant_str(node.slice):
            read.add(node.slice.value)
            allowed.add(id(node.value))
        elif (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn))
              and _is_name(node.comparators[0], kwargs_name) and _constant_str(node.left)):
            read.add(node.left.value)
            allowed.add(id(node.comparators[0]))
    uses = [node for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id in (args_name, kwargs_name)]
    if not methods or any(id(node) not in allowed for node in uses):
        return None
    return list(dict.fromkeys(methods)), read


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _constant_str(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


@dataclass(frozen=True)
class LatentCheck:
    """The latent must fit the convolution that embeds it, as the example's did.

    Recorded only when the example's latent had the convolution's channels on the axis a
    batched (or unbatched) input puts them, so a model that reshapes its latent first is
    never refused.
    """

    embedder: str
    ndim: int
    axis: int

    @classmethod
    def of(cls, embedder_path: str | None, embedder: nn.Module | None, latent: Any) -> "LatentCheck | None":
        if embedder_path is None or not isinstance(embedder, nn.modules.conv._ConvNd) \
                or not isinstance(latent, torch.Tensor) or not latent.is_floating_point():
            return None
        spatial = len(embedder.kernel_size)
        axis = latent.dim() - spatial - 1
        if axis not in (0, 1) or latent.shape[axis] != embedder.in_channels:
            return None
        return cls(embedder_path, latent.dim(), axis)

    def check(self, model: nn.Module, name: str, latent: Any) -> None:
        if not isinstance(latent, torch.Tensor):
            return
        if not latent.is_floating_point():
            raise CallError(f"the latent '{name}' has dtype {latent.dtype}, but {self.embedder} embeds floating-point "
                            f"latents", "pass the latent as a floating-point tensor in the model's dtype")
        if latent.dim() != self.ndim:
            return  # another layout: the trace's guards decide whether a new graph is needed
        channels = _in_channels(model, self.embedder)
        if channels is not None and latent.shape[self.axis] != channels:
            raise CallError(f"the latent '{name}' of shape {tuple(latent.shape)} has {latent.shape[self.axis]} "
                            f"channels on dimension {self.axis}, but {self.embedder} takes {channels}",
                            f"pass a latent with {channels} channels on dimension {self.axis}")


def _in_channels(model: nn.Module, path: str) -> int | None:
    module: nn.Module | None = model
    for part in path.split("."):  # a plain walk: this runs on every call, get_submodule costs more
        module = module._modules.get(part)
        if module is None:
            return None
    # A PEFT LoRA wrapper keeps the conv as its base_layer submodule (read from _modules: a
    # missing attribute costs nn.Module.__getattr__ an exception, 3 us on every call).
    wrapped = module._modules.get("base_layer")
    base = module if wrapped is None else wrapped
    channels = getattr(base, "in_channels", None)
    return channels if isinstance(channels, int) else None


@dataclass
class CallChecks:
    """Everything checked on a call before the rule's own checks; finds the latent."""

    entry: EntryPoint
    rule_inputs: tuple[str, ...]
    latent_param: str | None = None
    latent: LatentCheck | None = None

    def validate(self, model: nn.Module, inputs: Mapping[str, Any], rule_inputs: Mapping[str, Any],
                 positional: int) -> Any:
        """Check the call form and its tensors; return the latent (``None`` if not known)."""
        form = self.entry.form(positional, tuple(inputs)[positional:], self.rule_inputs)
        refuse_meta(model, inputs, rule_inputs)
        key = form.get(self.latent_param) if self.latent_param is not None else None
        if key is None and self.latent_param is not None and self.latent_param in inputs:
            key = self.latent_param  # an open entry point: the example's own key
        value = inputs.get(key) if key is not None else None
        if self.latent is not None and value is not None:
            self.latent.check(model, self.latent_param or key, value)
        return value


def parameter_of(entry: EntryPoint, positional: int, keywords: tuple[str, ...], key: str | None) -> str | None:
    """The parameter name of input ``key`` in a call of this form (``arg0`` -> ``x``)."""
    if key is None:
        return None
    form = entry.form(positional, keywords)
    return next((param for param, where in form.items() if where == key), key)


def model_on_meta(model: nn.Module) -> bool | None:
    """Whether the model's weights are on ``meta`` (``None``: it has no parameters)."""
    reference = next(model.parameters(), None)
    return None if reference is None else reference.device.type == "meta"


def refuse_meta(model: nn.Module, *groups: Mapping[str, Any]) -> None:
    """A top-level ``meta`` tensor in a call of a real model holds no values: refuse it."""
    for group in groups:
        for name, value in group.items():
            if isinstance(value, torch.Tensor) and value.is_meta and model_on_meta(model) is False:
                shown = name if not name.startswith("arg") else f"positional argument {name[3:]}"
                raise CallError(f"input '{shown}' is on the meta device but the model's weights are on "
                                f"{next(model.parameters()).device}",
                                "pass real tensors on the model's device (meta tensors hold no values)")
