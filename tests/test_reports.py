"""Reports: canonical graph text, graph diffs and goldens, Mermaid, atomic files, report schema."""
from __future__ import annotations

import errno
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn

from picture_models import Picture, forty_blocks, longlive_adapters, longlive_vace, read_picture, readme_pictures
from report_fakes import DoubledBlock, FakeGrafted, FakeGuard, FakeMatch, Tiny, TinyBranch, fake_result, tag_branch, trace
from rich.console import Console
from surgery.cli import render
from surgery.errors import ReportError
from surgery.reports import files as report_files
from surgery.reports.canonical import (
    HEADER,
    canonical_edges,
    canonical_graph_dict,
    canonical_nodes,
    canonical_text,
    parse_canonical,
)
from surgery.reports.diff import compare_to_golden, diff_graphs, group_changes, write_golden
from surgery.reports.files import atomic_write_many, atomic_write_text
from surgery.reports.mermaid import escape, mermaid_region
from surgery.reports.report import REPORT_JSON, REPORT_MD, build_report, render_markdown, write_report

# --- canonical form ---------------------------------------------------------------------


def test_canonical_text_is_stable_across_two_traces():
    torch.manual_seed(0)
    first = canonical_text(trace(TinyBranch()).graph)
    torch.manual_seed(1)  # different weights must not matter
    second = canonical_text(trace(TinyBranch()).graph)
    assert first == second
    assert first.startswith(HEADER + "\n")


def test_canonical_names_ignore_fx_generated_names():
    graph = trace(Tiny()).graph
    renamed = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for k, node in enumerate(graph.nodes):
        env[node] = renamed.node_copy(node, lambda n: env[n])
        if node.op not in ("placeholder", "output"):
            env[node]._rename(f"renamed_{len(graph.nodes) - k}")  # what a rewrite pass does to names
    assert [n.name for n in renamed.nodes] != [n.name for n in graph.nodes]
    assert canonical_text(renamed) == canonical_text(graph)


def test_canonical_lines_normalise_targets_and_literals():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
            self.register_buffer("table", torch.arange(4.0))

        def forward(self, x):
            y = self.layers[1](x) + self.table
            z = torch.cat([y, x], dim=-1)[..., :4].view(-1, 4)
            return torch.nn.functional.silu(z) * 0.5

    gm = trace(Odd())
    gm.graph.create_node("call_function", torch.add, (list(gm.graph.nodes)[0], torch.ones(2)), {})
    text = canonical_text(gm.graph)
    assert "%layers.1 = call_module layers.1(%in:x)" in text
    assert "call_function operator.add(%layers.1, %attr:table)" in text
    assert "torch.cat([%add, %in:x], dim=-1)" in text
    assert "operator.getitem(%cat, (..., slice(None, 4, None)))" in text
    assert "call_method view(%getitem, -1, 4)" in text
    assert "torch.nn.functional.silu(%view" in text
    assert "torch.add(%in:x, <Tensor>)" in text
    assert "0x" not in text  # no object addresses
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert len(lines) == len(gm.graph.nodes)


def test_canonical_names_are_scoped_and_counted():
    names = [n.name for n in canonical_nodes(trace(Tiny()).graph)]
    assert len(names) == len(set(names))
    assert "%blocks.0.norm" in names and "%blocks.2.ffn.1" in names
    assert "%blocks.0/add" in names and "%blocks.1/add" in names  # one add per block scope
    assert names[0] == "%in:x" and names[-1] == "%out"


def test_canonical_marks_inserted_nodes_and_shapes():
    gm = trace(TinyBranch())
    graph = tag_branch(gm.graph)
    for node in graph.nodes:
        if node.op == "call_module" and node.target == "head":
            node.meta["example_value"] = torch.empty(2, 4, device="meta")
    text = canonical_text(graph)
    assert "%@vace.inject.0/add = call_function operator.add(%blocks.0/add, %@vace.branch/mul)" in text
    assert re.search(r"^%vace_blocks\.1\.norm = .*  # vace:branch$", text, re.M)
    assert "%head = call_module head(%@vace.inject.1/add) :: float32[2,4]" in text
    parsed = {p.name: p for p in parse_canonical(text)}
    assert parsed["%@vace.inject.0/add"].role == "vace:inject"
    assert parsed["%vace_blocks.1.norm"].scope == "vace_blocks.1.norm"
    assert parsed["%vace_blocks.1/add"].scope == "vace_blocks.1"


def test_edge_list_and_json_form():
    graph = trace(Tiny()).graph
    edges = canonical_edges(graph)
    assert ("%in:x", "%embed") in edges and ("%head", "%out") in edges
    data = canonical_graph_dict(graph)
    assert json.loads(json.dumps(data)) == data
    assert len(data["nodes"]) == len(graph.nodes)
    assert [tuple(e) for e in data["edges"]] == edges
    assert {"name", "op", "target", "args", "scope", "meta", "role", "inputs"} <= set(data["nodes"][0])


# --- diffs and goldens ------------------------------------------------------------------


def _with_doubled_block(index: int) -> Tiny:
    model = Tiny()
    model.blocks[index] = DoubledBlock()
    return model


def test_diff_names_an_added_op_in_a_block():
    diff = diff_graphs(trace(Tiny()).graph, trace(_with_doubled_block(1)).graph)
    assert not diff.equal
    assert diff.changes[0] == "added blocks.1: call_function operator.mul (%blocks.1/mul)"
    assert diff.counts() == {"added": 1, "removed": 0, "changed": 1}
    changed = [c for c in diff.node_changes if c.status == "changed"]
    assert changed[0].name == "%blocks.1.ffn.0" and "inputs" in changed[0].detail
    assert "+%blocks.1/mul = call_function operator.mul(%blocks.1.norm, 2.0)" in diff.unified


def test_diff_names_a_removed_op_and_ignores_pure_renames():
    before = trace(_with_doubled_block(2)).graph
    after = trace(Tiny()).graph
    diff = diff_graphs(before, after)
    assert [c.status for c in diff.node_changes].count("removed") == 1
    assert "removed blocks.2: call_function operator.mul (%blocks.2/mul)" in diff.changes
    # Blocks 0 and 1 are untouched: nothing outside blocks.2 is reported.
    assert all(c.scope.startswith("blocks.2") for c in diff.node_changes)


def test_counter_shift_is_not_a_change():
    class TwoAdds(nn.Module):
        def forward(self, x):
            return (x + 1) + 2

    class ThreeAdds(nn.Module):
        def forward(self, x):
            return ((x + 0) + 1) + 2

    diff = diff_graphs(trace(TwoAdds()).graph, trace(ThreeAdds()).graph)
    # One add inserted at the front: it is added, the old first add is rewired, the last
    # add only got a new counter (#1 -> #2) and is not reported.
    assert [(c.status, c.name) for c in diff.node_changes] == [("added", "%add"), ("changed", "%add#1")]


def test_equal_graphs_give_an_empty_diff():
    diff = diff_graphs(trace(Tiny()).graph, trace(Tiny()).graph)
    assert diff.equal and diff.unified == "" and diff.changes == []


def test_golden_round_trip_and_drift(tmp_path):
    golden = tmp_path / "goldens" / "tiny.graph.txt"
    write_golden(trace(Tiny()).graph, golden)
    assert golden.read_text().startswith(HEADER)
    assert compare_to_golden(trace(Tiny()).graph, golden).equal
    drift = compare_to_golden(trace(_with_doubled_block(0)).graph, golden)
    assert not drift.equal
    assert "added blocks.0: call_function operator.mul (%blocks.0/mul)" in drift.changes
    assert drift.unified.startswith(f"--- {golden} (golden)\n+++ current\n")


def test_missing_golden_is_a_report_error(tmp_path):
    with pytest.raises(ReportError, match="does not exist.*--update"):
        compare_to_golden(trace(Tiny()).graph, tmp_path / "none.graph.txt")


def test_identical_changes_across_blocks_collapse():
    model = Tiny()
    for i in range(3):
        model.blocks[i] = DoubledBlock()
    groups = group_changes(diff_graphs(trace(Tiny()).graph, trace(model).graph).node_changes)
    added = [g for g in groups if g.status == "added"]
    assert [(g.path, g.target, g.count) for g in added] == [("blocks.*", "operator.mul", 3)]


# --- Mermaid picture ----------------------------------------------------------------------


def _sound(picture: Picture) -> None:
    """Every edge joins declared boxes, none loops or goes both ways, no label is an fx node name."""
    assert set(picture.labels) == set(picture.kinds) and picture.labels
    for a, b in picture.edges:
        assert a in picture.labels and b in picture.labels and a != b
        assert (b, a) not in picture.edges, f"two-way edge {picture.labels[a]} <-> {picture.labels[b]}"
    assert len(set(picture.edges)) == len(picture.edges)
    for lines in picture.labels.values():
        for line in lines:
            assert not re.search(r"%|\b[a-z]+_\d+\b|\b(add|mul|getitem|cat)(#|\b(?!\.))", line), line


def test_picture_of_vace_shows_the_chain_every_injection_point_and_the_branch():
    result = longlive_vace()
    picture = read_picture(mermaid_region(result.graph, result.matches, result.grafted))
    _sound(picture)
    assert picture.names == {
        # the main chain, runs of blocks between the injection points
        ("arg0", "patch_embedding"), ("patch_embedding", "input of blocks.0"), ("input of blocks.0", "blocks.0"),
        ("blocks.0", "+ vace 0"), ("+ vace 0", "blocks.1-2"), ("blocks.1-2", "+ vace 1"), ("+ vace 1", "blocks.3"),
        ("blocks.3", "head"), ("head", "output"),
        # the branch: fed by the context and by x0 (the stream entering blocks.0), feeding each hint
        ("vace_context", "vace_patch_embedding"), ("vace_patch_embedding", "vace_blocks.0"),
        ("input of blocks.0", "vace_blocks.0"), ("vace_blocks.0", "vace_blocks.1"),
        ("vace_blocks.0", "+ vace 0"), ("vace_blocks.1", "+ vace 1"),
    }
    assert picture.boxes("inject") == [["+ vace 0", "with vace_context_scale"], ["+ vace 1", "with vace_context_scale"]]
    assert ["blocks.1-2", "2 × CausalWanAttentionBlock"] in picture.boxes("block")
    assert ["patch_embedding", "Conv3d"] in picture.boxes("base")
    assert sorted(line[0] for line in picture.boxes("branch")) == ["vace_blocks.0", "vace_blocks.1", "vace_patch_embedding"]
    assert 'subgraph grafted ["vace: inserted branch"]' in picture.text


def test_readme_shows_the_real_longlive_picture():
    result = longlive_vace()
    report = build_report(result)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert readme_pictures(readme) == [mermaid_region(result.graph, report["matches"], report["grafted"])], \
        "README's report picture is stale: paste the picture of `surgery apply longlive --report out` into it"


def test_picture_of_another_rule_draws_an_adapter_after_each_block():
    result = longlive_adapters()
    picture = read_picture(mermaid_region(result.graph, result.matches, result.grafted))
    _sound(picture)
    chain = ["arg0", "patch_embedding"]
    for k in range(4):
        chain += [f"blocks.{k}", f"+ adapters.{k}"]
    assert picture.names == set(zip(chain + ["head"], chain[1:] + ["head", "output"]))
    assert "subgraph" not in picture.text  # the adapters run inside the injection points: no branch


def test_picture_of_forty_blocks_collapses_runs():
    picture = read_picture(mermaid_region(*forty_blocks(every=5)))
    _sound(picture)
    hints = [f"+ vace {k}" for k in range(8)]
    runs = ["blocks.0"] + [f"blocks.{a}-{a + 4}" for a in range(1, 36, 5)]
    chain = ["x", "embed"] + [box for pair in zip(runs, hints) for box in pair] + ["blocks.36-39", "head", "output"]
    assert set(zip(chain, chain[1:])) <= picture.names
    assert {(f"vace_blocks.{k}", f"+ vace {k}") for k in range(8)} <= picture.names
    assert len(picture.labels) == len(chain) + 2 + 8  # + vace_context, vace_embed and 8 VACE blocks


def test_picture_of_forty_injection_points_collapses_the_middle():
    picture = read_picture(mermaid_region(*forty_blocks(every=1)))
    _sound(picture)
    assert len(picture.labels) <= 16
    middle = ["blocks.2-38", "37 blocks, 36 injection points", "+ vace 2 .. + vace 37"]
    assert middle in picture.boxes("inject")
    assert ["vace_blocks.0-39", "40 × Block"] in picture.boxes("branch")
    chain = ["blocks.0", "+ vace 0", "blocks.1", "+ vace 1", "blocks.2-38", "+ vace 38", "blocks.39", "+ vace 39", "head"]
    assert set(zip(chain, chain[1:])) <= picture.names


def test_picture_without_matches_infers_the_blocks():
    result = fake_result()
    with_matches = read_picture(mermaid_region(result.graph, result.matches, result.grafted))
    inferred = read_picture(mermaid_region(result.graph))
    _sound(inferred)
    assert inferred.names == with_matches.names
    assert ("+ vace 0", "blocks.1-2") in inferred.names and ("vace_blocks.1", "+ vace 1") in inferred.names


def test_mermaid_is_empty_without_surgery():
    assert mermaid_region(trace(Tiny()).graph) == ""


def test_mermaid_labels_escape_quotes_and_brackets():
    assert escape('a "b" <c> & #d') == "a #quot;b#quot; #lt;c#gt; #amp; #35;d"
    result = fake_result()
    for node in result.graph.nodes:
        if "surgery" in node.meta:
            node.meta["surgery"]["rule"] = 'my "rule" <x>'
    text = mermaid_region(result.graph, result.matches, result.grafted)
    assert 'subgraph grafted ["my #quot;rule#quot; #lt;x#gt;: inserted branch"]' in text


# --- console tables ---------------------------------------------------------------------

GUARDS = [
    FakeGuard("shape", "x = [self.patch_embedding(u.unsqueeze(0)) for u in x]", "1", "examples/longlive.py:566"),
    FakeGuard("shape", "for u, v in zip(x, grid_sizes.tolist()):", "((None, None, None),)", "examples/wan/model.py:383"),
    FakeGuard("state", "if self.freqs.device != device:", "False", "/home/user/projects/models/transformer_wan.py:1234"),
    FakeGuard("input", "torch.stack([torch.cat([u, u.new_zeros(self.text_len - u.size(0), u.size(1))]) for u in context])",
              "[bold]1", "rules/vace.py:344"),
]


def _printed(table, width: int) -> str:
    out = Console(width=width, record=True, file=io.StringIO(), soft_wrap=True, highlight=False)
    out.print(table)
    return out.export_text()


def test_console_tables_show_model_code_verbatim():
    text = _printed(render.guards_table(GUARDS), 160)
    assert "x = [self.patch_embedding(u.unsqueeze(0)) for u in x]" in text
    assert "[bold]1" in text
    matches = [FakeMatch("blocks[0]", "Block[red]", 0, 0)]
    assert "blocks[0]" in _printed(render.matches_table(matches), 80)
    assert "Block[red]" in _printed(render.matches_table(matches), 80)
    assert "vace[x]" in _printed(render.grafted_table([FakeGrafted("vace[x]", 3)]), 80)
    failed = {"passed": False, "cases": [{"name": "case[b]", "max_abs_diff": 0.5, "tolerance": 0.0, "passed": False,
                                          "error": "shape [red] differs"}]}
    text = _printed(render.validation_table(failed), 80)
    assert "case[b]" in text and "FAIL shape [red] differs" in text
    assert "k[i]" in _printed(render.rows_table("t", [("k[i]", "v[dim]")]), 80)


def test_guard_locations_keep_their_line_numbers_at_80_columns():
    text = _printed(render.guards_table(GUARDS), 80)
    assert max(len(line) for line in text.splitlines()) <= 80
    for line in ("examples/longlive.py:566", "examples/wan/model.py:383", "…/transformer_wan.py:1234", "rules/vace.py:344"):
        assert line in text
    # Nothing of the expression is lost: folded, it reads back whole.
    column = "".join(row.split("│")[2].strip() for row in text.splitlines() if row.count("│") == 5)
    assert "x=[self.patch_embedding(u.unsqueeze(0))foruinx]" in column.replace(" ", "")


def test_markdown_cells_keep_code_and_names_verbatim():
    report = build_report(fake_result())
    report["guards"] = [{"kind": "shape", "expr": "a | b if `x` else <c>", "value": "<Tensor>", "where": "m.py:1"}]
    report["matches"][0]["class"] = "<lambda>"
    md = render_markdown(report, None, None)
    assert "| shape | ``a \\| b if `x` else <c>`` | &lt;Tensor&gt; | m.py:1 |" in md
    assert "| 0 | blocks.0 | &lt;lambda&gt; | 0 |" in md


# --- atomic files -----------------------------------------------------------------------


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_replaces_whole_files(tmp_path):
    atomic_write_many({tmp_path / "a.json": "{}", tmp_path / "b.md": "old"})
    atomic_write_many({tmp_path / "a.json": '{"x": 1}', tmp_path / "b.md": "new"})
    assert (tmp_path / "a.json").read_text() == '{"x": 1}'
    assert (tmp_path / "b.md").read_text() == "new"
    assert _leftovers(tmp_path) == ["a.json", "b.md"]


def test_failing_write_leaves_no_partial_report(tmp_path, monkeypatch):
    report = build_report(fake_result())
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # report.json staged fine; report.md hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(report_files.os, "fsync", failing_fsync)
    with pytest.raises(ReportError) as info:
        write_report(tmp_path / "out", report, "# report\n")
    message = str(info.value)
    assert str(tmp_path / "out") in message and "No space left" in message and "fix:" in message
    assert _leftovers(tmp_path / "out") == []  # neither file, no temporaries


def test_failing_write_keeps_the_previous_report(tmp_path, monkeypatch):
    out = tmp_path / "out"
    report = build_report(fake_result())
    write_report(out, report, "# old\n")
    old_json = (out / REPORT_JSON).read_text()

    def failing_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(report_files.os, "replace", failing_replace)
    with pytest.raises(ReportError, match="Input/output error"):
        write_report(out, {**report, "model": "Changed"}, "# new\n")
    assert (out / REPORT_JSON).read_text() == old_json
    assert (out / REPORT_MD).read_text() == "# old\n"
    assert _leftovers(out) == [REPORT_JSON, REPORT_MD]


def test_unwritable_directory_is_a_report_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ReportError) as info:
        write_report(blocker / "reports", build_report(fake_result()), "# x\n")
    assert str(blocker / "reports") in str(info.value) and "fix:" in str(info.value)
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_a_report_error(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(ReportError, match="Permission denied"):
            atomic_write_text(out / REPORT_JSON, "{}")
        assert _leftovers(out) == []
    finally:
        out.chmod(0o700)


# --- report.json / report.md ------------------------------------------------------------

TOP_KEYS = {"schema_version", "lora", "model", "source", "rule", "options", "matches", "rules", "build_order",
            "grafted", "guards", "validation", "timings", "dry_run", "graph", "golden"}


def test_report_json_schema_keys(tmp_path):
    result = fake_result()
    validation = {"passed": False, "cases": [
        {"name": "chunk 0", "max_abs_diff": 0.0, "passed": True, "tolerance": 0.0},
        {"name": "chunk 1", "max_abs_diff": torch.tensor(0.25), "passed": False, "tolerance": 0.0},
    ]}
    report = build_report(result, validation, {"validate_s": 1.5})
    assert set(report) == TOP_KEYS
    assert report["schema_version"] == 2
    assert report["rule"] == "vace" and report["model"] == "Tiny"
    assert report["options"] == {"vace_in_dim": 6, "vace_layers": [0, 2]}
    assert report["matches"][0] == {"name": "blocks.0", "class": "Block", "position": 0, "index": 0}
    assert report["matches"][1]["index"] is None
    assert set(report["grafted"][0]) == {"name", "params"}
    assert report["guards"][0] == {"kind": "shape", "expr": "x.shape[1]", "value": "5", "where": "report_fakes.py:1"}
    assert report["validation"]["passed"] is False
    assert report["validation"]["cases"][1] == {"name": "chunk 1", "max_abs_diff": 0.25, "passed": False,
                                                "tolerance": 0.0, "error": None}
    assert report["timings"] == {"trace_s": 0.01, "apply_s": 0.02, "validate_s": 1.5}
    inserted = sum(1 for n in result.graph.nodes if "surgery" in n.meta)
    assert report["graph"] == {"nodes": len(result.graph.nodes), "inserted": inserted,
                               "base_nodes": len(result.base_graph.nodes)}
    json_path, md_path = write_report(tmp_path / "r", report, render_markdown(report, result.base_graph, result.graph))
    assert json.loads(json_path.read_text()) == report
    assert md_path.read_text().startswith("# Surgery report: vace on Tiny")


def test_dry_run_report_has_unknown_graph_counts():
    result = fake_result()
    result.graph, result.grafted = None, []
    result.dry_run = True  # type: ignore[attr-defined]
    report = build_report(result)
    assert report["dry_run"] is True and report["grafted"] == []
    assert report["graph"]["nodes"] is None and report["graph"]["inserted"] is None
    md = render_markdown(report, result.base_graph, None)
    assert "3 matches, dry run (nothing grafted or rewritten), not validated." in md
    assert "```mermaid" not in md and "```diff" not in md


def test_report_without_validation_has_null_sections():
    report = build_report(fake_result())
    assert report["validation"] is None and report["golden"] is None and report["source"] is None
    assert report["timings"]["validate_s"] is None


def test_validation_from_a_list_of_case_objects():
    class Case:
        def __init__(self, name, diff):
            self.name, self.max_abs_diff, self.passed, self.tolerance = name, diff, diff == 0.0, 0.0

    report = build_report(fake_result(), [Case("a", 0.0), Case("b", 0.0)])
    assert report["validation"]["passed"] is True
    assert [c["name"] for c in report["validation"]["cases"]] == ["a", "b"]


def test_markdown_has_every_section():
    result = fake_result()
    report = build_report(result, {"passed": True, "cases": [{"name": "chunk 0", "max_abs_diff": 0.0,
                                                             "passed": True, "tolerance": 0.0}]}, source="pkg:fn")
    md = render_markdown(report, result.base_graph, result.graph)
    assert "**vace** on **Tiny**: 3 matches, 3 grafted modules" in md
    assert "validation PASSED (1/1 cases, max abs diff 0)" in md
    assert "| 0 | blocks.0 | Block | 0 |" in md
    assert "| vace_blocks.0 |" in md
    assert "| chunk 0 | 0 | 0 | pass |" in md
    assert "```mermaid\nflowchart TD\n" in md
    picture = read_picture(md.split("```mermaid\n")[1].split("```")[0])
    assert ("blocks.0", "+ vace 0") in picture.names and ("vace_blocks.1", "+ vace 1") in picture.names
    assert "```diff\n--- base (before surgery)\n+++ rewritten (after surgery)\n" in md
    assert "+%@vace.inject.0/add = call_function operator.add" in md
    assert "| added | vace_blocks.*.norm | call_module | `vace_blocks.*.norm` | vace:branch | x2 |" in md
    assert "| added | @vace.inject.* | call_function | `operator.add` | vace:inject | x2 |" in md
