"""``surgery`` / ``python -m surgery``: argument parsing and error handling.

Exit codes: 0 success; 1 validation failed or the graph drifted from its golden; 2 bad
usage, bad input or any SurgeryError (one line on stderr; the traceback only with
``--debug``); 3 an unexpected internal error (a bug: rerun with ``--debug``).
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import NoReturn, Sequence

from surgery.errors import SurgeryError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (argparse's default prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


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
    parser.add_argument("--seed", type=int, default=0, help="seed for a built-in model's random weights (default: 0)")


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the ``surgery`` script exits with it)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    debug = bool(getattr(args, "debug", False))
    try:
        return _dispatch(args)
    except SurgeryError as exc:
        if debug:
            traceback.print_exc()
        print(f"surgery: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("surgery: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: say so and keep it distinguishable in CI
        if debug:
            traceback.print_exc()
        print(f"surgery: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


__all__ = ["EXIT_FAILED", "EXIT_INTERNAL", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]
