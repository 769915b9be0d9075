"""The report pictures are valid Mermaid: Mermaid's own parser (npm ``mermaid`` under node, with
jsdom for its sanitiser; no browser) reads every picture the tests can draw, and rejects a
broken one. The packages are pinned in ``tests/mermaid/package-lock.json``; CI installs them
(``npm ci``), and this test does so itself when they are missing. Skipped only where node or
npm is not installed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from picture_models import forty_blocks, longlive_adapters, longlive_vace, readme_pictures
from report_fakes import fake_result
from surgery.reports.mermaid import mermaid_region
from surgery.reports.report import build_report, render_markdown

CHECKER = Path(__file__).parent / "mermaid"
NODE, NPM = shutil.which("node"), shutil.which("npm")

MISSING = [name for name, path in (("node", NODE), ("npm", NPM)) if path is None]

pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"{' and '.join(MISSING)} not installed: the Mermaid syntax check runs Mermaid's own parser under node "
           "(install nodejs and npm; the packages come from tests/mermaid/package-lock.json)")


@pytest.fixture(scope="module")
def parse(tmp_path_factory):
    """``parse({name: text}) -> {name: {"ok": bool, "error"?: str}}`` through ``tests/mermaid/parse.mjs``."""
    if not (CHECKER / "node_modules" / "mermaid" / "package.json").exists():
        done = subprocess.run([NPM, "ci", "--no-audit", "--no-fund"], cwd=CHECKER, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"npm ci in {CHECKER} failed:\n{done.stdout}\n{done.stderr}"
    folder = tmp_path_factory.mktemp("pictures")

    def run(pictures: dict[str, str]) -> dict[str, dict]:
        files = []
        for name, text in pictures.items():
            path = folder / f"{name}.mmd"
            path.write_text(text)
            files.append(str(path))
        done = subprocess.run([NODE, str(CHECKER / "parse.mjs"), *files], capture_output=True, text=True, timeout=300)
        results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        assert len(results) == len(files), f"parse.mjs gave no verdict for every file:\n{done.stdout}\n{done.stderr}"
        assert done.returncode == (0 if all(r["ok"] for r in results) else 1), done.stderr
        return {Path(r["file"]).stem: r for r in results}

    return run


@pytest.fixture(scope="module")
def pictures() -> dict[str, str]:
    vace, adapters, fake = longlive_vace(), longlive_adapters(), fake_result()
    report = build_report(vace)
    page = render_markdown(report, None, vace.graph)
    strange = fake_result()
    for node in strange.graph.nodes:
        if "surgery" in node.meta:
            node.meta["surgery"]["rule"] = 'a "rule" <b> & #1 [x] (y) {z} end'
    return {
        "longlive_vace": page.split("```mermaid\n")[1].split("```")[0],  # exactly what report.md holds
        "longlive_adapters": mermaid_region(adapters.graph, adapters.matches, adapters.grafted),
        "forty_every_5": mermaid_region(*forty_blocks(every=5)),
        "forty_every_1": mermaid_region(*forty_blocks(every=1)),
        "inferred_blocks": mermaid_region(fake.graph),
        "strange_rule_name": mermaid_region(strange.graph, strange.matches, strange.grafted),
        **{f"readme_{k}": text for k, text in enumerate(readme_pictures((CHECKER.parent.parent / "README.md").read_text()))},
    }


def test_every_picture_parses_as_a_mermaid_flowchart(parse, pictures):
    assert all(text.startswith("flowchart TD\n") for text in pictures.values())
    results = parse(pictures)
    failed = {name: r.get("error") for name, r in results.items() if not r["ok"]}
    assert not failed, failed
    assert {r["type"] for r in results.values()} == {"flowchart-v2"}


def test_the_parser_rejects_broken_pictures(parse, pictures):
    good = pictures["longlive_vace"]
    label = good.split('["', 1)[1].split('"]', 1)[0]
    broken = {
        "unclosed_label": good.replace(f'["{label}"]', f'["{label}', 1),
        "raw_quote_in_label": good.replace(f'["{label}"]', f'["{label} "quoted" here"]', 1),
        "dangling_edge": good.replace("  n0 --> ", "  n0 --> --> ", 1),
        "unclosed_subgraph": good.replace("  end\n", "", 1),
    }
    assert all(text != good for text in broken.values())
    results = parse({"good": good, **broken})
    assert results["good"]["ok"]
    for name in broken:
        assert not results[name]["ok"], f"{name} parsed although it is broken"
        assert results[name]["error"]
