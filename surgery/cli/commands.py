"""The CLI's pipelines as plain functions: parsed options in, exit code out.

Exit codes: 0 success; 1 validation failed or the graph drifted from its golden; 2 bad
input or any :class:`~surgery.errors.SurgeryError` (raised here, printed by ``main``).

The engine is reached through :class:`Backend` so tests can run these pipelines against
a fake engine; :func:`engine_backend` is the real one.
"""
from __future__ import annotations

import importlib
import inspect
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from rich.console import Console
from rich.table import Table

from surgery.cli import render
from surgery.cli.loading import (
    BaseLoader,
    BuildOptions,
    LoadedModel,
    ModelSource,
    build_rule,
    builtin_pipelines,
    load_model,
    parse_set,
    resolve_model,
    rule_parameters,
    rule_registry,
    size_of_width,
)
from surgery.cli.memory import memory_guard
from surgery.cli.preflight import check_device, check_output_file, check_report, check_weights, torch_dtype
from surgery.cli.safetensors_out import write_safetensors
from surgery.catalogue import default_rule
from surgery.cli.weights import BaseFile, base_file, base_rows, base_width, check_key_map_name
from surgery.errors import InputError, SurgeryError, WeightsError
from surgery.reports.diff import compare_to_golden, read_golden, write_golden
from surgery.reports.report import build_report, golden_section, normalise_validation, render_markdown, summary_line, write_report

#: Where ``surgery diff`` finds built-in goldens: ``<repo>/tests/goldens/<model>.graph.txt``.
GOLDENS_DIR = Path(__file__).resolve().parents[2] / "tests" / "goldens"
#: Console lines of unified diff shown by ``surgery diff`` (the report holds all of it).
MAX_CONSOLE_DIFF_LINES = 400
MAX_CONSOLE_GUARDS = 20


@dataclass
class ApplyOptions:
    """Options of ``surgery apply`` and ``surgery validate``."""

    model: str
    rule: str | None = field(default_factory=default_rule)
    set: list[str] = field(default_factory=list)
    size: str | None = None
    weights: str | None = None
    key_map: str | None = None  # a name in the rule's key_maps, for --weights and --base-weights
    base_weights: str | None = None  # the base model's checkpoint, when --weights holds only the rule's weights
    lora: str | None = None
    lora_scale: float | None = None  # None: 1.0
    lora_key_map: str | None = None
    validate: bool | None = None  # None: on for built-in models at tiny size, unless dry_run
    dry_run: bool = False
    report: str | None = None
    save: str | None = None
    seed: int = 0
    dtype: str | None = None  # a name of DTYPE_NAMES; None: float32 (a factory gets no dtype)
    device: str | None = None  # None: cpu (a factory gets no device)
    debug: bool = False


@dataclass
class DiffOptions:
    """Options of ``surgery diff``."""

    model: str
    rule: str | None = field(default_factory=default_rule)
    set: list[str] = field(default_factory=list)
    size: str | None = None
    golden: str | None = None
    update: bool = False
    report: str | None = None
    seed: int = 0
    dtype: str | None = None
    device: str | None = None
    debug: bool = False


@dataclass
class Backend:
    """The engine calls the CLI makes.

    ``apply(model, rule, example_inputs=..., dry_run=...)`` -> ``ApplyResult``;
    ``load_weights(module, path, rule, key_map_name)`` -> an object with ``as_rows()`` (or ``None``);
    ``load_base(model, path, rule, key_map_name)``: the same for the base model's weights, before surgery;
    ``validation_cases(loaded, result)`` -> cases, each with ``name`` and ``run()``
    returning an object or mapping with ``max_abs_diff``, ``passed``, ``tolerance``;
    ``load_lora(module, path, rule, scale, key_map_name)`` -> an object with ``as_rows()``.
    ``rule`` is the rule as applied (bound to the model's family).
    """

    apply: Callable[..., Any]
    load_weights: Callable[[Any, str, Any, "str | None"], Any]
    validation_cases: Callable[[LoadedModel, Any], Sequence[Any]]
    load_lora: Callable[[Any, str, Any, float, "str | None"], Any] = field(default=None)  # type: ignore[assignment]
    load_base: Callable[[Any, str, Any, "str | None"], Any] = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.load_lora is None:
            self.load_lora = _engine_load_lora
        if self.load_base is None:
            self.load_base = _engine_load_base


def _engine_apply(model: Any, rule: Any, *, example_inputs: Any, dry_run: bool) -> Any:
    import surgery

    return surgery.apply(model, rule, example_inputs=example_inputs, dry_run=dry_run)


def _engine_load_weights(module: Any, path: str, rule: Any, key_map_name: str | None) -> Any:
    from surgery.cli.weights import load_weights

    return load_weights(module, path, rule, key_map_name)


def _engine_load_base(model: Any, path: str, rule: Any, key_map_name: str | None) -> Any:
    from surgery.cli.weights import load_base

    return load_base(model, path, rule, key_map_name)


def _engine_load_lora(module: Any, path: str, rule: Any, scale: float, key_map_name: str | None) -> Any:
    from surgery.cli.weights import load_lora

    return load_lora(module, path, rule, scale, key_map_name)


def _engine_validation_cases(loaded: LoadedModel, result: Any) -> Sequence[Any]:
    try:
        validation = importlib.import_module("surgery.validation")
        cases = validation.validation_cases
    except (ImportError, AttributeError) as exc:
        raise InputError("validation is not available in this build (surgery.validation.validation_cases missing)",
                         "drop --validate") from exc
    return cases(result, model=loaded.model, pipeline=loaded.pipeline, example_inputs=loaded.example_inputs)


def engine_backend() -> Backend:
    """The real engine."""
    return Backend(apply=_engine_apply, load_weights=_engine_load_weights, validation_cases=_engine_validation_cases,
                   load_lora=_engine_load_lora, load_base=_engine_load_base)


def _print_result(out: Console, result: Any) -> None:
    out.print(render.matches_table(result.matches))
    out.print(render.grafted_table(result.grafted))
    guards = list(result.guards)
    if guards:
        out.print(render.guards_table(guards[:MAX_CONSOLE_GUARDS]))
        if len(guards) > MAX_CONSOLE_GUARDS:
            out.print(f"... and {len(guards) - MAX_CONSOLE_GUARDS} more guards (see --report)")


def run_validation(cases: Sequence[Any], *, debug: bool = False) -> dict[str, Any]:
    """Run validation cases under a progress bar; the ``validation`` report section.

    A case that raises a :class:`SurgeryError` aborts (exit 2); any other exception marks
    that case failed with its error, so one broken case does not hide the others.
    """
    results: list[dict[str, Any]] = []
    with render.progress(render.console(stderr=True)) as bar:
        task = bar.add_task("", total=len(cases))
        for case in cases:
            name = str(getattr(case, "name", case))
            bar.update(task, description=name)
            try:
                outcome = case.run()
            except SurgeryError:
                raise
            except Exception as exc:
                if debug:
                    traceback.print_exc()
                tolerance = getattr(case, "tolerance", 0.0)
                results.append({"name": name, "max_abs_diff": None, "passed": False, "tolerance": tolerance,
                                "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"})
            else:
                get = outcome.get if isinstance(outcome, Mapping) else lambda k, d=None: getattr(outcome, k, d)
                results.append({"name": name, "max_abs_diff": get("max_abs_diff"), "passed": bool(get("passed")),
                                "tolerance": get("tolerance", 0.0), "error": get("error")})
            bar.advance(task)
    section = normalise_validation({"passed": all(r["passed"] for r in results), "cases": results})
    assert section is not None
    return section


def save_grafted(module: Any, grafted: Sequence[Any], path: str | Path, rule_name: str) -> Path:
    """Write the grafted modules' tensors (native keys, e.g. ``vace_blocks.0.*``) to a safetensors file.

    The file is what ``--weights`` reads back; the base model's weights are not repeated.
    Tensors are streamed to the file from their own memory: saving adds no copy of the branch.
    """
    prefixes = tuple(f"{g.name}." for g in grafted)
    tensors = {key: value for key, value in module.state_dict().items() if key.startswith(prefixes)}
    if not tensors:
        raise InputError(f"nothing to save to {path}: the rule grafted no tensors", "drop --save")
    return write_safetensors(path, tensors, metadata={"format": "pt", "surgery_rule": rule_name})


def _plain(text: str) -> str:
    return text.replace("**", "")


SMALL_MODEL_PARAMS = 50_000_000


def _threads_for(model: Any) -> None:
    """One intra-op thread for small models.

    A tiny model's ops take microseconds, so extra threads only add synchronisation; on a
    busy 2-core machine validation ran 30 times slower with two threads than with one.
    """
    try:
        count = sum(p.numel() for p in model.parameters())
    except Exception:  # not an nn.Module: nothing to tune
        return
    if count < SMALL_MODEL_PARAMS:
        import torch
        torch.set_num_threads(1)


def _size_fix_text(source: ModelSource, settings: Sequence[str]) -> str:
    """The fix for running out of memory: the options that decide the sizes, with their values."""
    sizes = [f"--set {k}={v}" for k, v in parse_set(settings).items() if isinstance(v, int) and not isinstance(v, bool)]
    if source.builtin:
        sizes.append(f"--size (now {source.size})")
    return (f"lower the sizes asked for: {', '.join(sizes)}" if sizes else "use a smaller model") + ", or free memory"


def _rewrite(backend: Backend, loaded: LoadedModel, rule: Any, source: ModelSource, settings: Sequence[str],
             dry_run: bool) -> Any:
    # The example inputs the rule adds (a control input sized by the rule's options) and the
    # grafted modules are built here, so their size comes from the options.
    with memory_guard(f"for surgery on {loaded.name} (example inputs and grafted modules)",
                      _size_fix_text(source, settings)):
        return backend.apply(loaded.model, rule, example_inputs=loaded.example_inputs, dry_run=dry_run)


def build_options(seed: int, dtype: str | None, device: str | None) -> BuildOptions:
    """``--seed``/``--dtype``/``--device`` checked (the device exists here) and converted for loading."""
    return BuildOptions(seed=seed, dtype=torch_dtype(dtype) if dtype is not None else None,
                        device=check_device(device) if device is not None else None)


def _needs(flag: str, needed: str) -> InputError:
    return InputError(f"{flag} needs {needed}", f"add {needed} or drop {flag}")


def _check_combinations(opts: ApplyOptions) -> None:
    """Options that only make sense together (or never together)."""
    if opts.dry_run:
        for flag, given in (("--validate", opts.validate), ("--save", opts.save), ("--weights", opts.weights),
                            ("--base-weights", opts.base_weights), ("--lora", opts.lora)):
            if given:
                raise InputError(f"{flag} needs the rewritten model, which --dry-run does not build",
                                 f"drop --dry-run or {flag}")
    if opts.key_map is not None and not (opts.weights or opts.base_weights):
        raise _needs("--key-map", "--weights")
    for flag, given in (("--lora-scale", opts.lora_scale), ("--lora-key-map", opts.lora_key_map)):
        if given is not None and not opts.lora:
            raise _needs(flag, "--lora")


def _print_load(out: Console, title: str, load_report: Any, rows: Callable[[Any], Any] | None = None) -> None:
    if load_report is not None and hasattr(load_report, "as_rows"):
        out.print(render.rows_table(title, rows(load_report) if rows else load_report.as_rows()))


def _base_needed(opts: ApplyOptions, source: ModelSource, base: BaseFile | None) -> None:
    """Validation reads the base model's values: at real sizes they must come from a file."""
    if opts.validate and base is None and source.builtin and source.size != "tiny":
        raise InputError(f"validating {source.name} at --size {source.size} needs the base model's weights, and "
                         "random ones are made only at --size tiny",
                         "pass a full checkpoint (base and rule keys) to --weights, or the base model's checkpoint "
                         "to --base-weights; or drop --validate")


def _size_fix(error: WeightsError, source: ModelSource, base: BaseFile) -> WeightsError:
    """A base checkpoint made for another size of a built-in model: the fix names that ``--size``."""
    details = getattr(error, "details", None) or {}
    size = size_of_width(base_width(base.path)) if source.builtin and details.get("shape_mismatches") else None
    if size is None or size == source.size:
        return error
    fixed = WeightsError(error.problem, f"{base.path} is for --size {size}: pass --size {size}")
    fixed.details = details  # type: ignore[attr-defined]
    return fixed


def _base_loader(backend: Backend, base: BaseFile | None, rule: Any, map_name: str | None,
                 source: ModelSource) -> BaseLoader | None:
    """Loads the base weights into the model before surgery (``None`` when no file holds them)."""
    if base is None:
        return None

    def load(model: Any) -> Any:
        with memory_guard(f"to load the base weights from {base.flag} {base.path}",
                          "free memory, or build the model in a narrower --dtype"):
            try:
                return backend.load_base(model, base.path, rule, map_name)
            except WeightsError as error:
                raise _size_fix(error, source, base) from error

    return load


def _dtype_name(given: str | None, source: ModelSource, base: BaseFile | None) -> str | None:
    """``--dtype``, else for a built-in model the dtype its base checkpoint stores (loading never widens it)."""
    if given is not None or not source.builtin or base is None or base.dtype is None:
        return given
    return str(base.dtype).removeprefix("torch.")


def run_apply(opts: ApplyOptions, backend: Backend | None = None) -> int:
    """``surgery apply``: rewrite MODEL by rule, optionally load weights, validate, save, load a LoRA and report.

    Every option and path is checked before the model is built. The order is the API's,
    Base -> rule -> LoRA: the base weights (``--base-weights``, or the base keys of a full
    checkpoint given to ``--weights``) into the base model, surgery, the rule's weights of
    ``--weights``, validation and ``--save`` (of the rule's grafted weights), then ``--lora``
    into the rewritten model.
    """
    _check_combinations(opts)
    if opts.weights:
        check_weights(opts.weights)
    if opts.base_weights:
        check_weights(opts.base_weights, "base weights")
    if opts.lora:
        check_weights(opts.lora, "LoRA")
    if opts.save:
        check_output_file(opts.save)
    if opts.report:
        check_report(opts.report)
    source = resolve_model(opts.model, opts.size)
    rule = build_rule(opts.rule, opts.set, source)
    base = base_file(opts.weights, opts.base_weights, rule)
    build = build_options(opts.seed, _dtype_name(opts.dtype, source, base), opts.device)
    check_key_map_name(rule, opts.key_map, "--key-map")
    check_key_map_name(rule, opts.lora_key_map, "--lora-key-map")
    backend = backend or engine_backend()
    out = render.console()
    if opts.validate is None:
        # The main job (`surgery apply MODEL` on a built-in at tiny size) validates; large sizes and factories opt in.
        opts.validate = not opts.dry_run and source.builtin and source.size == "tiny"
    _base_needed(opts, source, base)
    need_values = bool(opts.validate or opts.save or opts.weights or opts.lora)
    loaded = load_model(opts.model, size=opts.size, need_values=need_values, build=build,
                        base=_base_loader(backend, base, rule, opts.key_map, source))
    if base is not None:
        _print_load(out, f"Base weights: {base.path}", loaded.base_load, base_rows)
    # A rule that adapts to the model's family knows that family's key maps only now.
    check_key_map_name(rule, opts.key_map, "--key-map", loaded.model)
    check_key_map_name(rule, opts.lora_key_map, "--lora-key-map", loaded.model)
    _threads_for(loaded.model)
    result = _rewrite(backend, loaded, rule, source, opts.set, opts.dry_run)
    applied = getattr(result, "rule", None) or rule
    _print_result(out, result)

    if opts.weights:
        with memory_guard(f"to load --weights {opts.weights}", "free memory"):
            load_report = backend.load_weights(result.module, opts.weights, applied, opts.key_map)
        _print_load(out, f"Weights: {opts.weights}", load_report)

    validation = None
    timings: dict[str, float] = {}
    if opts.validate:
        cases = list(backend.validation_cases(loaded, result))
        if not cases:
            raise InputError(f"no validation cases for model {opts.model}", "drop --validate or give example inputs")
        start = time.perf_counter()
        validation = run_validation(cases, debug=opts.debug)
        timings["validate_s"] = time.perf_counter() - start
        out.print(render.validation_table(validation))

    if opts.save:
        saved = save_grafted(result.module, result.grafted, opts.save, rule.name)
        out.print(f"saved grafted weights to {saved}")

    if opts.lora:
        scale = 1.0 if opts.lora_scale is None else opts.lora_scale
        with memory_guard(f"to load --lora {opts.lora}", "free memory"):
            lora_report = backend.load_lora(result.module, opts.lora, applied, scale, opts.lora_key_map)
        _print_load(out, f"LoRA: {opts.lora}", lora_report)

    report = build_report(result, validation, timings, source=opts.model)
    if opts.report:
        paths = write_report(opts.report, report, render_markdown(report, result.base_graph, result.graph))
        out.print(f"report: {paths[0]}, {paths[1]}")
    out.print(_plain(summary_line(report)))
    return 0 if validation is None or validation["passed"] else 1


def run_validate(opts: ApplyOptions, backend: Backend | None = None) -> int:
    """``surgery validate``: ``apply`` with validation always on."""
    opts.validate = True
    return run_apply(opts, backend)


def default_golden(loaded: LoadedModel | ModelSource, rule_name: str | None = None) -> Path:
    """``tests/goldens/<model>.graph.txt`` for a built-in model at size tiny (``<model>.<size>.graph.txt`` otherwise).

    Goldens are per rule; the default rule's (:func:`surgery.catalogue.default_rule`, also when
    ``rule_name`` is ``None``) are unqualified, others get ``<model>.<rule>``.
    """
    if not loaded.builtin:
        raise InputError(f"model {loaded.name} has no built-in golden graph", "pass --golden FILE (create it with --update)")
    stem = loaded.name if rule_name in (None, default_rule()) else f"{loaded.name}.{rule_name}"
    if loaded.size and loaded.size != "tiny":
        stem += f".{loaded.size}"
    return GOLDENS_DIR / f"{stem}.graph.txt"


def run_diff(opts: DiffOptions, backend: Backend | None = None) -> int:
    """``surgery diff``: compare the rewritten graph with its golden (exit 1 on drift) or ``--update`` it.

    The golden is read (or, with ``--update``, its place checked) before the model is built.
    """
    build = build_options(opts.seed, opts.dtype, opts.device)
    source = resolve_model(opts.model, opts.size)
    rule = build_rule(opts.rule, opts.set, source)
    golden_path = Path(opts.golden) if opts.golden else default_golden(source, opts.rule)
    if opts.update:
        check_output_file(str(golden_path))
        golden_text = None
    else:
        golden_text = read_golden(golden_path)
    if opts.report:
        check_report(opts.report)
    backend = backend or engine_backend()
    out = render.console()
    loaded = load_model(opts.model, size=opts.size, need_values=False, build=build)
    result = _rewrite(backend, loaded, rule, source, opts.set, False)

    golden = None
    code = 0
    if opts.update:
        write_golden(result.graph, golden_path)
        out.print(f"wrote golden {golden_path} ({len(result.graph.nodes)} nodes)")
    else:
        diff = compare_to_golden(result.graph, golden_path, golden_text)
        golden = golden_section(diff, golden_path)
        if diff.equal:
            out.print(f"graph matches golden {golden_path}")
        else:
            code = 1
            counts = diff.counts()
            out.print(f"[red]graph drifted from golden {golden_path}[/]: "
                      f"{counts['added']} added, {counts['removed']} removed, {counts['changed']} changed")
            colours = {"added": "green", "removed": "red", "changed": "yellow"}
            for change in diff.node_changes:
                out.print(f"  [{colours[change.status]}]{change.describe()}[/]", markup=True, highlight=False)
            lines = diff.unified.splitlines()
            out.print("\n".join(lines[:MAX_CONSOLE_DIFF_LINES]), markup=False, highlight=False)
            if len(lines) > MAX_CONSOLE_DIFF_LINES:
                out.print(f"... {len(lines) - MAX_CONSOLE_DIFF_LINES} more diff lines (use --report DIR for all)")
            golden_flag = f" --golden {opts.golden}" if opts.golden else ""
            out.print(f"if the change is intended: surgery diff {opts.model}{golden_flag} --update", markup=False)

    if opts.report:
        report = build_report(result, source=opts.model, golden=golden)
        paths = write_report(opts.report, report, render_markdown(report, result.base_graph, result.graph))
        out.print(f"report: {paths[0]}, {paths[1]}")
    return code


def run_models() -> int:
    """``surgery models``: the built-in example models (exit 2 if one cannot be imported)."""
    pipelines = builtin_pipelines()
    if not pipelines:
        raise InputError("no built-in models: examples.PIPELINES is missing",
                         "run from the repository root (or install it) so `examples` imports")
    table = Table(title=f"Built-in models ({len(pipelines)})", title_justify="left")
    table.add_column("name", no_wrap=True)
    for col in ("base", "frames", "window", "sink"):
        table.add_column(col, no_wrap=True)
    table.caption = "frames: latent frames per chunk; window: local_attn_size; sink: sink frames"
    broken: list[str] = []
    for name in pipelines:
        try:
            spec = pipelines[name]
        except Exception as exc:  # one broken stand-in must not hide the others
            broken.append(f"{name}: {type(exc).__name__}: {exc}")
            table.add_row(name, "[red]broken[/]", *["-"] * 3)
            continue
        config = getattr(spec, "config", None)

        def cfg(key: str) -> str:
            value = getattr(config, key, None)
            return "-" if value is None else str(value)

        table.add_row(
            name,
            cfg("base_model"),
            cfg("num_frame_per_block"),
            cfg("local_attn_size"),
            cfg("sink_size"),
        )
    out = render.console()
    out.print(table)
    out.print("sizes: --size tiny (default), 1.3B, 14B; MODEL may also be package.module:factory")
    if broken:
        raise InputError(f"built-in model {broken[0]}", "fix the stand-in module so that it imports")
    return 0


def _describe_options(factory: Callable[..., Any]) -> str:
    params = rule_parameters(factory)
    if params is None:
        return "**kwargs"
    parts = []
    for name, p in params.items():
        parts.append(name if p.default is inspect.Parameter.empty else f"{name}={p.default!r}")
    return ", ".join(parts) or "(none)"


def _describe_key_maps(factory: Callable[..., Any]) -> str:
    """Names of the key maps of the rule built with its defaults (a rule bound to a model may add others)."""
    try:
        built = factory()
    except Exception:  # a rule without defaults for every option: its maps depend on the options
        return "-"
    return ", ".join(getattr(built, "key_maps", None) or {}) or "-"


def _package(registry: Any, name: str) -> str:
    """`` (from <package>)`` for a rule an installed package registers, ``""`` for a built-in."""
    origin = getattr(registry, "origin", None)
    where = origin(name) if origin is not None else "built-in"
    return "" if where == "built-in" else f" (from {where})"


def run_rules() -> int:
    """``surgery rules``: registered rules, their options and key maps (exit 2 if one cannot be imported)."""
    RULES = rule_registry()
    table = Table(title=f"Rules ({len(RULES)})", title_justify="left")
    for col in ("name", "description", "options (--set KEY=VALUE)", "key maps (--key-map NAME)"):
        table.add_column(col)
    broken: list[str] = []
    for name in RULES:
        try:
            factory = RULES[name]
        except Exception as exc:  # a rule module that fails to import is reported, not fatal for the listing
            broken.append(f"{name}: {type(exc).__name__}: {exc}")
            table.add_row(name, f"[red]unavailable[/]: {type(exc).__name__}: {exc}{_package(RULES, name)}", "-", "-")
            continue
        doc = (inspect.getdoc(factory) or "").strip().splitlines()
        table.add_row(name, (doc[0] if doc else "") + _package(RULES, name), _describe_options(factory),
                      _describe_key_maps(factory))
    render.console().print(table)
    if broken:
        raise InputError(f"rule {broken[0]}", "fix the rule module so that it imports")
    return 0


__all__ = [
    "ApplyOptions",
    "Backend",
    "DiffOptions",
    "build_options",
    "GOLDENS_DIR",
    "default_golden",
    "engine_backend",
    "run_apply",
    "run_diff",
    "run_models",
    "run_rules",
    "run_validate",
    "run_validation",
    "save_grafted",
]
