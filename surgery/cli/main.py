"""``surgery`` / ``python -m surgery``: argument parsing and error handling.

Exit codes: 0 success (also when the reader of stdout went away, as in ``surgery models |
head -1``); 1 validation failed or the graph drifted from its golden; 2 bad usage, bad
input, any SurgeryError or too little memory for the sizes asked for (one line on stderr;
the traceback only with ``--debug``); 3 an unexpected internal error (a bug: one line
pointing at ``--debug``); 130 interrupted (Ctrl-C). No traceback is shown without ``--debug``.

:func:`guarded` and :func:`interruptible` give other command-line tools (the benchmark
harness in ``benchmarks/``) the same exit codes and one-line errors.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import traceback
from typing import Any, Callable, NoReturn, Sequence

from surgery.cli.memory import describe, is_out_of_memory
from surgery.errors import InputError, SurgeryError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
SEED_MAX = 2 ** 64 - 1  # torch.manual_seed's range for non-negative seeds
#: ``--dtype`` names (torch dtypes of the same name).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: Where the benchmark harness lives now (benchmarks/ is beside the package, not installed with it).
BENCH_COMMAND = "python benchmarks/bench.py"


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (argparse's default prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def parse_seed(text: str) -> int:
    """``--seed``: an integer from 0 to 2**64-1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: not an integer") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range: use an integer from 0 to 2**64-1")
    return value


def parse_finite(text: str) -> float:
    """A finite real number (argparse type), e.g. ``--lora-scale``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


class _Version(argparse.Action):
    """``--version``: the package's version and torch's (torch is imported only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        import torch

        print(f"surgery {package_version()} (torch {torch.__version__})")
        parser.exit(EXIT_OK)


def package_version() -> str:
    """The installed distribution's version (``pyproject.toml``), or ``unknown`` when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("surgery")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _rule_names() -> list[str]:
    from surgery.cli.loading import rule_registry

    return list(rule_registry())


def _common(parser: argparse.ArgumentParser, *, sizes: bool = True) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of errors")
    if not sizes:
        return
    from surgery.cli.loading import SIZES

    parser.add_argument("--size", choices=SIZES, default=None,
                        help="size of a built-in model (default: tiny); ignored for package.module:factory")
    parser.add_argument("--seed", type=parse_seed, default=0, help="seed for a built-in model's random weights (default: 0)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="build the model in this dtype (default: float32; a factory gets it as its dtype= argument)")
    parser.add_argument("--device", metavar="DEVICE", default=None,
                        help="build and run the model on DEVICE: cpu, cuda, cuda:1, ... (default: cpu; a factory "
                             "gets it as its device= argument); checked to exist before any work")


def _model_and_rule(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="built-in model name (see `surgery models`) or package.module:factory")
    from surgery.catalogue import default_rule

    default = default_rule()
    parser.add_argument("--rule", default=default, choices=_rule_names(), help=f"rule to apply (default: {default})")
    parser.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                        help="rule option as a Python literal, e.g. --set layers=[0,2] (see `surgery rules`); repeatable")


def _weights_and_lora(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", metavar="PATH",
                        help="load the weights of the --rule's grafted modules (safetensors file, index or "
                             "directory); a full checkpoint (base and rule keys) loads the base model's weights too")
    parser.add_argument("--base-weights", metavar="PATH",
                        help="load the base model's weights from PATH before surgery (when --weights holds only "
                             "the rule's weights)")
    parser.add_argument("--key-map", metavar="NAME",
                        help="rename the --weights (and --base-weights) keys with the rule's key map NAME, e.g. "
                             "diffusers (see `surgery rules`)")
    parser.add_argument("--lora", metavar="FILE",
                        help="load a LoRA safetensors file into the rewritten model, after --weights "
                             "(Base -> rule -> LoRA), after validation and --save")
    parser.add_argument("--lora-scale", type=parse_finite, metavar="S",
                        help="scale of the --lora adapter (default: 1.0)")
    parser.add_argument("--lora-key-map", metavar="NAME", help="rename the --lora keys with the rule's key map NAME")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and documentation)."""
    parser = OneLineParser(
        prog="surgery",
        description="Rule-based model surgery on torch.fx graphs.",
        epilog="exit codes: 0 success; 1 validation failed or the graph drifted from its golden; "
               "2 bad usage, bad input or a surgery error; 3 internal error (rerun with --debug); 130 interrupted",
    )
    parser.add_argument("--version", action=_Version, help="print the surgery and torch versions and exit")
    parser.add_argument("--debug", action="store_true", default=False, help="show the traceback of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, help="what to do")

    for name, help_text in (("apply", "rewrite a model by rule"),
                            ("validate", "rewrite a model and validate it against the reference")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        _model_and_rule(p)
        _weights_and_lora(p)
        if name == "apply":
            p.add_argument("--validate", action=argparse.BooleanOptionalAction, default=None,
                           help="validate against the reference, exit 1 on mismatch (default: on for "
                                "built-in models at tiny size, unless --dry-run)")
            p.add_argument("--dry-run", action="store_true", help="trace and match only; build nothing")
        p.add_argument("--report", metavar="DIR", help="write report.json and report.md into DIR")
        p.add_argument("--save", metavar="PATH", help="save the grafted modules' weights (safetensors)")
        _common(p)

    p = sub.add_parser("diff", help="compare the rewritten graph with its golden (exit 1 on drift)",
                       description="Compare the canonical rewritten graph with a golden file; exit 1 on drift.")
    _model_and_rule(p)
    p.add_argument("--golden", metavar="FILE", help="golden file (default for built-in models: tests/goldens/MODEL.graph.txt)")
    p.add_argument("--update", action="store_true", help="write the golden instead of comparing")
    p.add_argument("--report", metavar="DIR", help="write report.json and report.md into DIR")
    _common(p)

    _common(sub.add_parser("rules", help="list the rules, their options and key maps",
                           description="List the rules, their options and key maps."), sizes=False)
    _common(sub.add_parser("models", help="list the built-in models", description="List the built-in models."),
            sizes=False)
    # Kept as a name only, so that `surgery bench ...` says where the benchmark went (exit 2);
    # its arguments are collected by parse_known_args in _parse.
    sub.add_parser("bench", help=f"moved out of the package: run `{BENCH_COMMAND}` from the repository root",
                   add_help=False)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _moved_bench(argv: Sequence[str]) -> NoReturn:
    command = " ".join([BENCH_COMMAND, *map(shlex.quote, argv)])
    raise InputError("`surgery bench` has moved out of the package into the repository's benchmarks/ folder",
                     f"run `{command}` from the repository root (benchmarks/README.md describes it)")


def _dispatch(args: argparse.Namespace) -> int:
    from surgery.cli import commands

    if args.command in ("apply", "validate"):
        opts = commands.ApplyOptions(
            model=args.model, rule=args.rule, set=list(args.set), size=args.size, weights=args.weights,
            base_weights=args.base_weights, key_map=args.key_map, lora=args.lora, lora_scale=args.lora_scale,
            lora_key_map=args.lora_key_map,
            validate=getattr(args, "validate", None), dry_run=getattr(args, "dry_run", False),
            report=args.report, save=args.save, seed=args.seed, dtype=args.dtype, device=args.device,
            debug=args.debug,
        )
        return commands.run_validate(opts) if args.command == "validate" else commands.run_apply(opts)
    if args.command == "diff":
        return commands.run_diff(commands.DiffOptions(
            model=args.model, rule=args.rule, set=list(args.set), size=args.size, golden=args.golden,
            update=args.update, report=args.report, seed=args.seed, dtype=args.dtype, device=args.device,
            debug=args.debug,
        ))
    if args.command == "rules":
        return commands.run_rules()
    if args.command == "models":
        return commands.run_models()
    if args.command == "bench":
        _moved_bench(args.bench_args)
    raise AssertionError(f"unhandled command {args.command}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _say(line: str) -> None:
    """One line on stderr; a closed stderr is not worth a traceback."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush into a closed pipe cannot fail.

    The recipe of Python's "Note on SIGPIPE" (signal module documentation).
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor behind stdout (e.g. captured in tests)
        pass


def guarded(prog: str, work: Callable[[], int], *, debug: bool = False) -> int:
    """``work()``'s exit code, with every error turned into one line on stderr and its exit code.

    A :class:`SurgeryError` or running out of memory is exit 2, any other exception exit 3
    (a bug); the traceback is printed only with ``debug``. A closed stdout pipe propagates
    (:func:`interruptible` handles it).
    """
    try:
        return work()
    except BrokenPipeError:
        raise
    except SurgeryError as exc:
        if debug:
            traceback.print_exc()
        _say(f"{prog}: error: {_one_line(exc)}")
        return EXIT_USAGE
    except Exception as exc:  # a bug, not bad input: say so and keep it distinguishable in CI
        if debug:
            traceback.print_exc()
        if is_out_of_memory(exc):  # the sizes asked for do not fit this machine: not a bug
            _say(f"{prog}: error: not enough memory{describe(exc)}; fix: use a smaller --size or model, "
                 "or free memory")
            return EXIT_USAGE
        _say(f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)")
        return EXIT_INTERNAL


def interruptible(prog: str, run: Callable[[], int]) -> int:
    """``run()``'s exit code; Ctrl-C is exit 130 with one line, a reader that went away exit 0."""
    try:
        code = run()
        sys.stdout.flush()  # a closed pipe shows here at the latest, not in the interpreter's final flush
        return code
    except BrokenPipeError:  # the reader went away (`surgery models | head -1`): nothing left to say
        _silence_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted")
        return EXIT_INTERRUPTED


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return guarded("surgery", lambda: _dispatch(args), debug=bool(getattr(args, "debug", False)))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the ``surgery`` script exits with it)."""
    return interruptible("surgery", lambda: _run(argv))


__all__ = [
    "BENCH_COMMAND",
    "DTYPE_NAMES",
    "EXIT_FAILED",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "OneLineParser",
    "build_parser",
    "guarded",
    "interruptible",
    "main",
    "package_version",
    "parse_finite",
    "parse_seed",
]
