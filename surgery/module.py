"""The rewritten model: the input model's class plus a dispatcher over specialised graphs.

Each call is matched against the guards of the cached specialisations (most recent
first). A call with new input sizes reuses a graph when its Python decisions re-derive
unchanged (``rechecked``); a call that fits none is traced and rewritten again, never run
on a wrong graph. The cache is bounded; evictions are counted so leaks show up in reports.

Every call is checked before any graph runs or is built, whatever its form (positional or
keyword latent, through a PEFT wrapper, after a re-specialisation): the base entry point's
arguments (:mod:`.entry`), then the rule's own inputs (``Rule.check_call``).

The rewritten class's ``forward``, and each method the base ``forward`` passes its arguments
on to (``_forward_inference``), show the base signature plus the rule's inputs as keyword-only
parameters, so a host that filters keyword arguments by ``inspect.signature`` passes
the rule's inputs (e.g. ``vace_context``) through; a call of such a method is traced from that
method.

Under ``torch.compile`` the entry methods and the dispatch are skipped by dynamo (guard checks,
re-specialisation and timing are Python bookkeeping that would otherwise become guarded
constants and recompile every call); the generated function of the chosen specialisation is
then compiled as a frame of its own, once per specialisation.

A rewritten model pickles (``torch.save``, ``pickle``, ``copy.deepcopy``) as its module tree
plus the recipe of its rule (registered name and options, :mod:`.saving`); loading rebuilds
the rule and an empty specialisation cache, so the first call traces again.

A model rewritten by several rules in sequence (:func:`surgery.apply` on a rewritten model)
carries them all (``SurgeryState.rules``, in application order): each specialisation traces
the base class's code once, matches every rule's pattern on that base graph and runs the
rules' actions in rule order; calls take every rule's inputs, each checked by its own rule.
"""
from __future__ import annotations

import inspect
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from .entry import CallChecks, EntryPoint
from .rewriting.specialise import Specialisation, call_signature, specialise
from .rule import Rule, combined_inputs
from .saving import rebuild_rule, rule_recipe

_CLASSES: dict[tuple, type] = {}


@dataclass
class SurgeryState:
    """Per-model surgery bookkeeping (kept out of ``state_dict`` and ``named_modules``).

    ``rule`` is the last rule applied; ``earlier`` the rules applied before it, in order.
    """

    rule: Rule
    base_cls: type
    latent_input: str | None
    limit: int = 8
    specialisations: "OrderedDict[int, Specialisation]" = field(default_factory=OrderedDict)
    evictions: int = 0
    built: int = 0
    last_misses: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    rechecks: int = 0
    #: The previous call's dispatch: ``"cached"``, ``"rechecked"`` or ``"specialised"``, and
    #: the seconds from entry to a runnable graph (guard checks, recheck or new trace).
    last_dispatch: tuple[str, float] = ("none", 0.0)
    #: The base entry point's checks and where the latent is (set by ``apply``).
    checks: CallChecks | None = None
    earlier: tuple[Rule, ...] = ()
    _next_key: int = 0

    @property
    def rules(self) -> tuple[Rule, ...]:
        """Every rule the model carries, in application order (the last is ``rule``)."""
        return (*self.earlier, self.rule)

    @property
    def inputs(self) -> Mapping[str, Any]:
        """The call inputs of every rule, with their defaults."""
        return self.rule.inputs if not self.earlier else combined_inputs(self.rules)

    @property
    def guards(self) -> list:
        return [g for spec in self.specialisations.values() for g in spec.guards.notes]

    def split(self, args: tuple, kwargs: dict) -> tuple[dict[str, Any], dict[str, Any], int]:
        kwargs = dict(kwargs)
        rule_inputs = {name: kwargs.pop(name, default) for name, default in self.inputs.items()}
        inputs: dict[str, Any] = {f"arg{i}": value for i, value in enumerate(args)}
        inputs.update(sorted(kwargs.items()))
        return inputs, rule_inputs, len(args)

    def lookup(self, model: nn.Module, inputs: dict[str, Any], entry: str = "forward") -> Specialisation | None:
        signature = call_signature(inputs)
        misses = []
        for key in reversed(self.specialisations):
            spec = self.specialisations[key]
            if spec.entry != entry:
                continue
            rechecked = spec.guards.rechecked
            failure = spec.guards.first_failure(signature, inputs, model)
            if failure is None:
                self.specialisations.move_to_end(key)
                if spec.guards.rechecked != rechecked:
                    self.rechecks += 1
                    self.reasons.append("new input sizes: reused a graph, its decisions re-derived unchanged")
                return spec
            misses.append(failure)
        self.last_misses = misses
        return None

    def add(self, spec: Specialisation) -> None:
        self.specialisations[self._next_key] = spec
        self._next_key += 1
        self.built += 1
        while len(self.specialisations) > self.limit:
            self.specialisations.popitem(last=False)
            self.evictions += 1

    def clear(self) -> None:
        """Drop every cached graph: the next calls trace again (e.g. to see newly injected layers).

        Not needed for correctness: generated code calls modules by name on the live model,
        so layers swapped in later (PEFT's LoRA wrappers) are used by cached graphs too.
        """
        self.specialisations.clear()

    def prepare(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, Any], int]:
        """Split and check a call (base arguments, then the rule's inputs) before any graph."""
        inputs, rule_inputs, positional = self.split(args, kwargs)
        if self.checks is not None:
            latent = self.checks.validate(model, inputs, rule_inputs, positional)
        else:
            latent = inputs.get(self.latent_input) if self.latent_input else None
        for rule in self.rules:
            own = {name: rule_inputs[name] for name in rule.inputs}
            inputs.update(rule.check_call(own, inputs, latent, model))
        return inputs, positional

    def saved(self) -> dict[str, Any]:
        """What a pickle keeps besides the module tree and the rule's recipe."""
        checks = self.checks
        return {"latent_input": self.latent_input, "limit": self.limit,
                "latent_param": checks.latent_param if checks else None, "latent": checks.latent if checks else None}

    @classmethod
    def restored(cls, rules: tuple[Rule, ...], base_cls: type, saved: dict[str, Any]) -> "SurgeryState":
        state = cls(rule=rules[-1], base_cls=base_cls, latent_input=saved["latent_input"], limit=saved["limit"],
                    earlier=rules[:-1])
        state.checks = CallChecks(EntryPoint.of(base_cls), tuple(state.inputs), saved["latent_param"],
                                  saved["latent"])
        state.reasons.append("restored from a pickle or copy")
        return state

    # ``torch.compile``: dynamo skips this frame (a graph break with nothing before it) but
    # compiles the frames it calls, so the generated graph function is compiled as a frame
    # of its own (its own code object: one cache entry per specialisation), while the
    # dispatch before it runs eagerly.
    @torch.compiler.disable(recursive=False)
    def call(self, model: nn.Module, args: tuple, kwargs: dict, entry: str = "forward") -> Any:
        """Run a call of ``entry`` (``forward`` or a method it dispatches to) on its specialised graph."""
        spec, inputs = self.dispatch(model, args, kwargs, entry)
        # map(), not a comprehension: a comprehension is a frame dynamo would try to compile.
        return spec.fn(model, model, *map(inputs.__getitem__, spec.input_names))

    # Guard checks, rechecks, tracing and timing are Python bookkeeping: never traced by dynamo.
    @torch.compiler.disable
    def dispatch(self, model: nn.Module, args: tuple, kwargs: dict,
                 entry: str = "forward") -> tuple[Specialisation, dict[str, Any]]:
        """The specialisation a call runs on (checked, rechecked or newly traced) and its inputs."""
        started = time.perf_counter()
        rechecks = self.rechecks
        inputs, positional = self.prepare(model, args, kwargs)
        spec = self.lookup(model, inputs, entry)
        outcome = "rechecked" if self.rechecks != rechecks else "cached"
        if spec is None:
            spec, _, _ = specialise(model, self.base_cls, self.rules, inputs, positional, entry)
            self.add(spec)
            self.reasons.append("; ".join(self.last_misses) if self.last_misses else "first call")
            outcome = "specialised"
        self.last_dispatch = (outcome, time.perf_counter() - started)
        return spec, inputs


class RewrittenModel(nn.Module):
    """Mixin placed in front of the input model's class; see the module docstring."""

    # Skipped by dynamo like ``SurgeryState.call``: compiled, this frame would be guarded on
    # every input and recompiled for each new input size, for no graph at all.
    @torch.compiler.disable(recursive=False)
    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102 - documented above
        return self.surgery_state.call(self, args, kwargs)

    @property
    def surgery_state(self) -> SurgeryState:
        return self.__dict__["_surgery"]

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # The class is made at run time and the generated graphs are code: neither pickles.
        # Kept instead: the base class, the rule's recipe, and the module tree (tensors included).
        # Several rules (composition) keep a list of recipes, in order.
        state = self.surgery_state
        recipe: Any = rule_recipe(state.rule) if not state.earlier else [rule_recipe(r) for r in state.rules]
        body = dict(self.__getstate__())
        body.pop("_surgery", None)
        return (_restore, (state.base_cls, recipe, state.saved()), body)

    def _apply(self, fn: Any, recurse: bool = True) -> "RewrittenModel":
        # Plain tensor attributes (a RoPE table kept out of the state_dict so .to(dtype)
        # cannot touch it) follow the parameters' device but keep their dtype. The traced
        # graph reads them directly, so they must be where the model is.
        super()._apply(fn, recurse)
        reference = next(self.parameters(), None)
        if reference is not None and reference.device.type != "meta":
            for module in self.modules():
                for name, value in list(vars(module).items()):
                    if not name.startswith("_") and isinstance(value, torch.Tensor) and value.device != reference.device:
                        module.__dict__[name] = value.to(reference.device)
        return self


def _restore(base_cls: type, recipe: tuple[str, dict[str, Any]] | list[tuple[str, dict[str, Any]]],
             saved: dict[str, Any]) -> RewrittenModel:
    """Unpickling: an empty rewritten model with its rules rebuilt; pickle then sets its tree."""
    rules = tuple(map(rebuild_rule, recipe)) if isinstance(recipe, list) else (rebuild_rule(recipe),)
    model = object.__new__(rewritten_class(base_cls, combined_inputs(rules)))
    model.__dict__["_surgery"] = SurgeryState.restored(rules, base_cls, saved)
    return model


def rewritten_class(base_cls: type, inputs: Mapping[str, Any] | None = None) -> type:
    """``Rewritten<Base>``: subclass of both, so ``isinstance(m, Base)`` still holds.

    ``inputs`` are the rule's call inputs and defaults: ``forward`` and every entry method
    (see the module docstring) list them as keyword-only parameters.
    """
    inputs = dict(inputs or {})
    key = (base_cls, tuple((name, repr(default)) for name, default in inputs.items()))
    if key not in _CLASSES:
        body: dict[str, Any] = {"__module__": base_cls.__module__}
        for name in entry_methods(base_cls):
            body[name] = _entry(base_cls, name, inputs)
        _CLASSES[key] = type(f"Rewritten{base_cls.__name__}", (RewrittenModel, base_cls), body)
    return _CLASSES[key]


def entry_methods(base_cls: type) -> list[str]:
    """``forward`` and the methods it passes its ``*args, **kwargs`` on to (:mod:`.entry`)."""
    names = ["forward"]
    for qualname, _ in EntryPoint.of(base_cls).targets:
        name = qualname.rsplit(".", 1)[-1]
        if name not in names and callable(inspect.getattr_static(base_cls, name, None)):
            names.append(name)
    return names


def _entry(base_cls: type, name: str, inputs: Mapping[str, Any]) -> Any:
    """A method that runs calls of ``name`` through surgery, with the signature hosts read."""
    def entry(self: RewrittenModel, *args: Any, **kwargs: Any) -> Any:
        return self.surgery_state.call(self, args, kwargs, name)

    entry.__name__ = name
    entry.__qualname__ = f"Rewritten{base_cls.__name__}.{name}"
    entry.__doc__ = getattr(getattr(base_cls, name), "__doc__", None)
    entry.__signature__ = with_inputs(inspect.signature(getattr(base_cls, name)), inputs)  # type: ignore[attr-defined]
    return torch.compiler.disable(entry, recursive=False)  # see RewrittenModel.forward


def with_inputs(signature: inspect.Signature, inputs: Mapping[str, Any]) -> inspect.Signature:
    """``signature`` plus keyword-only ``inputs`` (with their defaults), before any ``**kwargs``."""
    params = list(signature.parameters.values())
    names = {p.name for p in params}
    tail = [p for p in params if p.kind is p.VAR_KEYWORD]
    head = [p for p in params if p.kind is not p.VAR_KEYWORD]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
             for name, default in inputs.items() if name not in names]
    return signature.replace(parameters=head + added + tail)
