"""``surgery`` / ``python -m surgery``: argument parsing and error handling.

Exit codes: 0 success (also when the reader of stdout went away, as in ``surgery models |
head -1``); 1 validation failed or the graph drifted from its golden; 2 bad usage, bad
input, any SurgeryError or too little memory for the sizes asked for (one line on stderr;
the traceback only with ``--debug``); 3 an unexpected internal error (a bug: one line
pointing at ``--debug``); 130 interrupted (Ctrl-C). No traceback is shown without ``--debug``.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import NoReturn, Sequence

from surgery.cli.memory import describe, is_out_of_memory
from surgery.errors import SurgeryError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
SEED_MAX = 2 ** 64 - 1  # torch.manual_seed's range for non-negative seeds


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (argparse's default prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: not an integer") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range: use an integer from 0 to 2**64-1")
    return value


def _rule_names() -> list[str]:
    from rules import RULES

    return list(RULES)


def _common(parser: argparse.ArgumentParser, *, sizes: bool = True) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of errors")
    if not sizes:
        return
    from surgery.cli.loading import SIZES

    parser.add_argument("--size", choices=SIZES, default=None,
                        help="size of a built-in model (default: tiny); ignored for package.module:factory")
    parser.add_argument("--seed", type=_seed, default=0, help="seed for a built-in model's random weights (default: 0)")


def _model_and_rule(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="built-in model name (see `surgery models`) or package.module:factory")
    parser.add_argument("--rule", default="vace", choices=_rule_names(), help="rule to apply (default: vace)")
    parser.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                        help="rule option as a Python literal, e.g. --set vace_layers=[0,2]; repeatable")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and documentation)."""
    parser = _Parser(
        prog="surgery",
        description="Rule-based model surgery on torch.fx graphs.",
        epilog="exit codes: 0 success; 1 validation failed or the graph drifted from its golden; "
               "2 bad usage, bad input or a surgery error; 3 internal error (rerun with --debug)",
    )
    parser.add_argument("--debug", action="store_true", default=False, help="show the traceback of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, help_text in (("apply", "rewrite a model by rule"),
                            ("validate", "rewrite a model and validate it against the reference")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        _model_and_rule(p)
        p.add_argument("--weights", metavar="PATH", help="load the grafted branch's weights (safetensors file or directory)")
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

    _common(sub.add_parser("rules", help="list the rules and their options"), sizes=False)
    _common(sub.add_parser("models", help="list the built-in models"), sizes=False)
    p = sub.add_parser("bench", help="run the benchmarks", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    from surgery.cli import commands

    if args.command in ("apply", "validate"):
        opts = commands.ApplyOptions(
            model=args.model, rule=args.rule, set=list(args.set), size=args.size, weights=args.weights,
            validate=getattr(args, "validate", None), dry_run=getattr(args, "dry_run", False),
            report=args.report, save=args.save, seed=args.seed, debug=args.debug,
        )
        return commands.run_validate(opts) if args.command == "validate" else commands.run_apply(opts)
    if args.command == "diff":
        return commands.run_diff(commands.DiffOptions(
            model=args.model, rule=args.rule, set=list(args.set), size=args.size, golden=args.golden,
            update=args.update, report=args.report, seed=args.seed, debug=args.debug,
        ))
    if args.command == "rules":
        return commands.run_rules()
    if args.command == "models":
        return commands.run_models()
    if args.command == "bench":
        return commands.run_bench(args.bench_args)
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


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    debug = bool(getattr(args, "debug", False))
    try:
        return _dispatch(args)
    except BrokenPipeError:
        raise
    except SurgeryError as exc:
        if debug:
            traceback.print_exc()
        _say(f"surgery: error: {_one_line(exc)}")
        return EXIT_USAGE
    except Exception as exc:  # a bug, not bad input: say so and keep it distinguishable in CI
        if debug:
            traceback.print_exc()
        if is_out_of_memory(exc):  # the sizes asked for do not fit this machine: not a bug
            _say(f"surgery: error: not enough memory{describe(exc)}; fix: use a smaller --size or model, "
                 "or free memory")
            return EXIT_USAGE
        _say(f"surgery: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)")
        return EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the ``surgery`` script exits with it)."""
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here at the latest, not in the interpreter's final flush
        return code
    except BrokenPipeError:  # the reader went away (`surgery models | head -1`): nothing left to say
        _silence_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        _say("surgery: interrupted")
        return EXIT_INTERRUPTED


__all__ = ["EXIT_FAILED", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]
