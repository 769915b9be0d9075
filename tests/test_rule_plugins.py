"""A rule from another package: installed with an entry point in the ``surgery.rules`` group,
it is listed by ``surgery rules``, accepted by ``--rule`` and applied like a built-in one."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import surgery
from examples import PIPELINES
from examples.driver import compare, example_call, run_stream
from rules import ENTRY_POINT_GROUP, RULES

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "surgery-test-plugin-rule"
MODULE = "surgery_test_plugin_rule"
RULE = "ffn-scale-test-plugin"

PLUGIN = '''
"""A third-party rule: every FFN's output scaled by ``factor`` (1.0: the model unchanged)."""
from surgery.matching.pattern import FEED_FORWARD
from surgery.rule import Rule, Where
from surgery.tracing.policy import TracePolicy


def rule(factor: float = 2.0) -> Rule:
    """Scale every FFN's output."""
    return Rule(name="ffn-scale-test-plugin", options={"factor": factor}, pattern=FEED_FORWARD, expected=None,
                assign=lambda position, count: position, grafts=lambda context: {},
                actions=((Where.AFTER_EACH, lambda site: site.stream * factor),), inputs={},
                check_call=lambda inputs, call, latent, model: {}, trace_policy=TracePolicy())
'''


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True,
                   capture_output=True, text=True)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    source = tmp_path_factory.mktemp("plugin")
    (source / f"{MODULE}.py").write_text(PLUGIN)
    (source / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{DISTRIBUTION}"
        version = "0.0.1"

        [project.entry-points."{ENTRY_POINT_GROUP}"]
        {RULE} = "{MODULE}:rule"

        [tool.setuptools]
        py-modules = ["{MODULE}"]
    """))
    _pip("install", "--no-deps", "--no-build-isolation", str(source))
    RULES.refresh()
    try:
        yield RULE
    finally:
        _pip("uninstall", "-y", DISTRIBUTION)
        sys.modules.pop(MODULE, None)
        RULES.refresh()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "surgery", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_an_installed_rule_is_listed_and_applied_by_the_cli(plugin):
    listing = _cli("rules")
    assert listing.returncode == 0, listing.stderr
    assert plugin in listing.stdout and "ffn-adapter" in listing.stdout and "vace" in listing.stdout
    assert DISTRIBUTION in listing.stdout  # where it comes from
    applied = _cli("apply", "longlive", "--rule", plugin, "--set", "factor=0.5", "--no-validate")
    assert applied.returncode == 0, applied.stderr
    assert "blocks.3.ffn" in applied.stdout


def test_an_installed_rule_applies_through_the_registry(plugin):
    assert list(RULES)[:2] == ["vace", "ffn-adapter"] and plugin in RULES
    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, RULES[plugin](factor=0.5), example_inputs=example_call(base, pipeline))
    assert len(result.matches) == 4
    reference = pipeline.build("tiny", seed=0)
    for block in reference.blocks:
        block.ffn.register_forward_hook(lambda module, args, out: out * 0.5)
    assert compare(run_stream(result.module, pipeline, chunks=3), run_stream(reference, pipeline, chunks=3)) == 0.0


def test_a_package_cannot_take_a_built_in_name(monkeypatch):
    from rules import _LazyRules

    monkeypatch.setattr("rules.installed_rules", lambda group: {"vace": ("elsewhere:rule", "squatter"),
                                                                "extra": ("pkg:rule", "pkg")})
    registry = _LazyRules({"vace": "rules.vace:rule"}, ENTRY_POINT_GROUP)
    assert registry.spec == {"vace": "rules.vace:rule", "extra": "pkg:rule"}
    assert (registry.origin("vace"), registry.origin("extra")) == ("built-in", "pkg")
