"""Resolve the CLI's MODEL argument and ``--rule``/``--set`` options into objects.

MODEL is either a built-in example name (a key of ``examples.PIPELINES``) or
``package.module:factory``, where ``factory()`` returns a model or ``(model, (args, kwargs))``.
Surgery traces one call of the model, so a factory that returns only a model must return
an instance of a built-in model class (its call is known) or say how to call it.

A built-in model gets random weights only at ``--size tiny``. Otherwise it is built on the
``meta`` device (no initialisation runs, nothing is allocated) and then either traced as it
is, given its base weights from a checkpoint (assigned, never copied twice), or, where only
storage matters (saving the grafted branch, loading the rule's weights), given zero pages that
cost no memory until written: surgery itself never reads the base model's values.

``--dtype``/``--device`` build a built-in model in that dtype on that device (its example
inputs follow the model); a factory receives them as its ``dtype=``/``device=`` keyword
arguments and must return a model that has them. The built-in models and the rules are the
CLI's catalogue, which this module reads through :mod:`surgery.catalogue` (entry points).
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from surgery.cli.memory import memory_guard
from surgery.errors import InputError, SurgeryError

SIZES = ("tiny", "1.3B", "14B")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class ModelSource:
    """What the MODEL argument names, known before anything is built or imported from user code."""

    name: str  # the MODEL argument as given
    pipeline: Any = None  # examples PipelineSpec for built-in models, else None
    size: str | None = None  # built-in models only

    @property
    def builtin(self) -> bool:
        return self.pipeline is not None


@dataclass
class LoadedModel:
    """A model ready for surgery, with what the CLI knows about where it came from."""

    name: str  # the MODEL argument as given (built-in name or package.module:factory)
    model: nn.Module
    example_inputs: tuple[tuple, dict] | None
    pipeline: Any = None  # examples PipelineSpec for built-in models, else None
    size: str | None = None
    base_load: Any = None  # what the base-weights loader returned, when the base came from a file

    @property
    def builtin(self) -> bool:
        return self.pipeline is not None


#: Fills a model's base weights (e.g. from a checkpoint) and returns a load report.
BaseLoader = Callable[[nn.Module], Any]


@dataclass(frozen=True)
class BuildOptions:
    """How to build the model: ``--seed``, ``--dtype``, ``--device`` (``None``: the default, not passed to a factory)."""

    seed: int = 0
    dtype: torch.dtype | None = None
    device: torch.device | None = None

    def factory_kwargs(self) -> dict[str, Any]:
        """The keyword arguments a factory gets: only the options that were given."""
        return {name: value for name, value in (("dtype", self.dtype), ("device", self.device)) if value is not None}


def rule_registry() -> Mapping[str, Callable[..., Any]]:
    """The registered rule registry (``rules.RULES``): rule name -> factory (imported on first lookup)."""
    from surgery.catalogue import rule_registry as registered

    return registered()


def builtin_pipelines() -> Mapping[str, Any]:
    """The registered models' ``PIPELINES`` (``examples.PIPELINES``; {} when none are registered)."""
    from surgery.catalogue import models_module

    return getattr(models_module(), "PIPELINES", {}) or {}


def _example_call(model: nn.Module, pipeline: Any, seed: int) -> tuple[tuple, dict]:
    # The streaming driver knows each pipeline's call convention (spec 8.3).
    from surgery.catalogue import models_module

    driver = importlib.import_module(f"{models_module().__name__}.driver")
    args, kwargs = driver.example_call(model, pipeline, seed=seed)
    return tuple(args), dict(kwargs)


def _with_storage(model: nn.Module, device: torch.device) -> None:
    """Zero pages for every parameter and buffer of a meta-built model (no memory until written)."""
    from surgery.grafting.build import allocate

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    allocate(model, device=device, dtype=dtype)


def _load_builtin(source: ModelSource, build: BuildOptions, need_values: bool, base: BaseLoader | None) -> LoadedModel:
    size = source.size or "tiny"
    device = build.device or torch.device("cpu")
    # Random weights only at tiny size, and only when no file provides the base: at real sizes a
    # random init costs minutes and the model's size in memory, and nothing reads those values.
    random = size == "tiny" and base is None
    with memory_guard(f"to build {source.name} at --size {size} and its example inputs",
                      "use a smaller --size (tiny is the default), or free memory"):
        model = source.pipeline.build(size=size, seed=build.seed, init="random" if random else "meta",
                                      device=device, dtype=build.dtype or torch.float32)
        base_load = None
        if base is not None:
            base_load = base(model)  # meta tensors become the file's values, on the CPU
            if device.type != "cpu":
                model.to(device)
        elif need_values and not random:
            _with_storage(model, device)
        inputs = _example_call(model, source.pipeline, build.seed)
    return LoadedModel(name=source.name, model=model, example_inputs=inputs, pipeline=source.pipeline, size=size,
                       base_load=base_load)


def _pipeline_modules() -> dict[str, str]:
    """The registered models' ``PIPELINE_MODULES`` (built-in name -> module name), or {} without them."""
    from surgery.catalogue import models_module

    return dict(getattr(models_module(), "PIPELINE_MODULES", {}) or {})


def pipeline_of(model: nn.Module) -> Any:
    """The built-in pipeline whose model class ``model`` is (or derives from), else ``None``."""
    modules = _pipeline_modules()
    pipelines = builtin_pipelines()
    for cls in type(model).__mro__:
        for name, module_name in modules.items():
            if cls.__module__ == module_name and name in pipelines and pipelines[name].model_class is cls:
                return pipelines[name]
    return None


def _derived_inputs(model: nn.Module, spec: str, seed: int) -> tuple[tuple, dict]:
    """Example inputs for a factory that returned only a model: known for the built-in model classes."""
    pipeline = pipeline_of(model)
    if pipeline is None:
        raise InputError(
            f"factory {spec} returned a {type(model).__module__}.{type(model).__qualname__} without example inputs, "
            "and the command line can make example inputs only for the model classes of the built-in models "
            f"({', '.join(_pipeline_modules()) or 'none installed'})",
            "return (model, (args, kwargs)) from the factory: the arguments of one typical call of the model, "
            "its caches included",
        )
    with memory_guard(f"to make example inputs for {spec}", "build a smaller model in the factory, or free memory"):
        return _example_call(model, pipeline, seed)


def _split_example(value: Any, spec: str) -> tuple[nn.Module, tuple[tuple, dict] | None]:
    if isinstance(value, nn.Module):
        return value, None
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], nn.Module):
        inputs = value[1]
        if inputs is None:
            return value[0], None
        if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], Mapping):
            return value[0], (tuple(inputs[0]), dict(inputs[1]))
        raise InputError(
            f"factory {spec} returned example inputs of type {type(inputs).__name__}",
            "return (model, (args_tuple, kwargs_dict))",
        )
    raise InputError(
        f"factory {spec} returned {type(value).__name__}, not a torch.nn.Module",
        "return a model or (model, (args, kwargs)) from the factory",
    )


def _check_reference(spec: str) -> None:
    module_name, _, attr = spec.partition(":")
    if not _DOTTED.match(module_name) or not _DOTTED.match(attr):
        raise InputError(f"bad model reference {spec!r}", "write it as package.module:factory")


def _factory_arguments(target: Callable[..., Any], spec: str, build: BuildOptions) -> dict[str, Any]:
    """``dtype=``/``device=`` for the factory, refused before the call if it does not take them."""
    kwargs = build.factory_kwargs()
    if not kwargs:
        return kwargs
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a callable without a signature (some builtins): assume it takes none
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name in kwargs:
        param = params.get(name)
        if not takes_any and (param is None or param.kind is inspect.Parameter.POSITIONAL_ONLY):
            raise InputError(f"factory {spec} takes no {name} argument, so --{name} cannot be applied to its model",
                             f"add a {name}= parameter to the factory (it gets the torch.{name}), or drop --{name}")
    return kwargs


def _check_built(model: nn.Module, spec: str, build: BuildOptions) -> None:
    """The factory's model has the dtype and device it was given (a factory may ignore its arguments)."""
    for name, tensor in model.named_parameters():
        if build.dtype is not None and tensor.is_floating_point() and tensor.dtype != build.dtype:
            raise InputError(f"factory {spec} was given dtype={build.dtype} but returned parameter {name} "
                             f"in {tensor.dtype}", "build the model in the dtype the factory receives")
        if build.device is not None and not _same_device(tensor.device, build.device):
            raise InputError(f"factory {spec} was given device={build.device} but returned parameter {name} "
                             f"on {tensor.device}", "build the model on the device the factory receives")


def _same_device(have: torch.device, want: torch.device) -> bool:
    # "cuda" means the current device, which tensors report with its index.
    return have.type == want.type and (want.index is None or have.index == want.index)


def _load_factory(spec: str, build: BuildOptions, base: BaseLoader | None) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is an input problem
        raise InputError(
            f"cannot import {module_name!r} for model {spec}: {type(exc).__name__}: {exc}",
            "check the module path and that it imports (PYTHONPATH)",
        ) from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InputError(f"{module_name!r} has no attribute {attr!r} (model {spec})", "name an existing factory function")
        target = getattr(target, part)
    if isinstance(target, nn.Module):
        if build.factory_kwargs():
            given = ", ".join(f"--{name}" for name in build.factory_kwargs())
            raise InputError(f"{spec} is a model, not a factory, so {given} cannot be applied to it",
                             f"point MODEL at a function that builds the model (with dtype=/device= parameters), "
                             f"or drop {given}")
        value: Any = target
    elif callable(target):
        kwargs = _factory_arguments(target, spec, build)
        try:
            value = target(**kwargs)
        except SurgeryError:
            raise
        except Exception as exc:  # the user's factory failed: bad input, not a surgery bug (exit 2, not 3)
            raise InputError(
                f"factory {spec} raised {type(exc).__name__}: {exc}",
                "fix the factory so that calling it with no arguments returns a model (rerun with --debug for the traceback)",
            ) from exc
    else:
        raise InputError(f"{spec} is a {type(target).__name__}, not a model factory", "point MODEL at a function that returns a model")
    model, inputs = _split_example(value, spec)
    _check_built(model, spec, build)
    base_load = base(model) if base is not None else None
    if inputs is None:
        inputs = _derived_inputs(model, spec, build.seed)
    return LoadedModel(name=spec, model=model, example_inputs=inputs, base_load=base_load)


def size_of_width(width: int | None) -> str | None:
    """The built-in size whose models are ``width`` wide (their ``dim``), if there is one."""
    from surgery.catalogue import models_module

    try:
        sizes = getattr(models_module(), "MODEL_SIZES", None) or {}
    except ImportError:
        return None
    return next((size for size in SIZES if width is not None and sizes.get(size, {}).get("dim") == width), None)


def resolve_model(spec: str, size: str | None = None) -> ModelSource:
    """What MODEL names, checked without building or importing anything of the user's.

    Raises :class:`InputError` for an unknown name, an unknown size or a malformed
    ``package.module:factory`` reference.
    """
    pipelines = builtin_pipelines()
    if spec in pipelines:
        size = size or "tiny"
        if size not in SIZES:
            raise InputError(f"unknown size {size!r}", f"use one of {', '.join(SIZES)}")
        return ModelSource(spec, pipelines[spec], size)
    if ":" in spec:
        _check_reference(spec)
        return ModelSource(spec)
    known = ", ".join(sorted(pipelines)) or "(none installed)"
    raise InputError(f"unknown model {spec!r}", f"use a built-in model ({known}) or package.module:factory")


def load_model(spec: str, size: str | None = None, seed: int = 0, need_values: bool = True,
               build: BuildOptions | None = None, base: BaseLoader | None = None) -> LoadedModel:
    """Build the model named by the CLI's MODEL argument, with example inputs for one call.

    A built-in model at tiny size has random weights. At real sizes (1.3B, 14B) it is built
    on meta: ``need_values=False`` leaves it there (enough for tracing, matching and graph
    diffs), ``True`` gives it storage as zero pages (no memory until written). ``base(model)``
    fills the base weights instead (e.g. from a checkpoint) before the example inputs are
    made; a built-in model is then built on meta at any size and never initialised, and what
    ``base`` returns is kept as ``base_load``. ``build`` (seed, dtype, device) replaces
    ``seed`` when given. Raises :class:`InputError` for an unknown name, an
    unimportable module, a factory that does not return a model (or not in the dtype and on
    the device it was given, or that takes no dtype/device argument when one was given), a
    factory model without example inputs whose call the CLI does not know, or too little
    memory for the sizes asked for.
    """
    build = build or BuildOptions(seed=seed)
    source = resolve_model(spec, size)
    if source.builtin:
        return _load_builtin(source, build, need_values, base)
    return _load_factory(spec, build, base)


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``--set KEY=VALUE`` items; VALUE is a Python literal (``96``, ``[0, 2]``, ``None``) or else a string."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise InputError(f"bad --set {item!r}", "write --set KEY=VALUE, e.g. --set layers=[0,2]")
        try:
            value: Any = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        options[key] = value
    return options


def rule_factory(name: str) -> Callable[..., Any]:
    """The factory registered as ``rules.RULES[name]``."""
    RULES = rule_registry()
    if name not in RULES:
        raise InputError(f"unknown rule {name!r}", f"use one of {', '.join(RULES)} (see `surgery rules`)")
    return RULES[name]


def rule_parameters(factory: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """Named options a rule factory accepts (``None`` if it takes ``**kwargs``)."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def build_rule(name: str, settings: Sequence[str], loaded: LoadedModel | ModelSource | None = None) -> Any:
    """Build rule ``name`` from ``--set`` items.

    For a built-in model built at its pipeline's real size (``config.base_model``), any rule
    option the pipeline's config also names (e.g. ``vace_in_dim``, ``vace_layers``) defaults to
    the pipeline's value, because those values describe the real checkpoint (a 40-layer
    layer list does not fit a 4-layer tiny build). ``--set`` always wins.
    """
    factory = rule_factory(name)
    given = parse_set(settings)
    params = rule_parameters(factory)
    if params is not None:
        unknown = sorted(set(given) - set(params))
        if unknown:
            raise InputError(
                f"unknown option {', '.join(unknown)} for rule {name}",
                f"use one of {', '.join(params) or '(none)'}",
            )
    options: dict[str, Any] = {}
    config = getattr(loaded.pipeline, "config", None) if loaded is not None else None
    if config is not None and params is not None and loaded.size == getattr(config, "base_model", None):
        options = {k: getattr(config, k) for k in params if hasattr(config, k)}
    options.update(given)
    if params is not None:
        # Names were checked above; a TypeError now is a bug in the rule, not bad input.
        return factory(**options)
    try:
        return factory(**options)
    except TypeError as exc:
        raise InputError(f"rule {name} rejected its options: {exc}", "check `surgery rules` for the option names") from exc


__all__ = [
    "SIZES",
    "BaseLoader",
    "BuildOptions",
    "LoadedModel",
    "ModelSource",
    "build_rule",
    "builtin_pipelines",
    "load_model",
    "pipeline_of",
    "resolve_model",
    "parse_set",
    "rule_factory",
    "rule_parameters",
    "rule_registry",
    "size_of_width",
]
