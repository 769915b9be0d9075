"""Benchmarks of surgery (run from the repository root; not part of the installed package).

``python benchmarks/bench.py --help`` is the harness; see benchmarks/README.md.
"""
