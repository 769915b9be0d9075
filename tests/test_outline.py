"""Outlined code: blocks replayed from one template run one generated function each, and an
instance is outlined only when moving its body into a call cannot reorder side effects."""
from __future__ import annotations

import torch

import surgery
from examples import PIPELINES
from examples.driver import example_call
from rules import vace
from surgery.rewriting.outline import find_instances
from surgery.rewriting.specialise import specialise


def _specialised(name: str = "longlive"):
    pipeline = PIPELINES[name]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline))
    model, state = result.module, result.module.surgery_state
    args, kwargs = example_call(model, pipeline, vace_context=torch.zeros(1, 96, 3, 4, 4))
    inputs, positional = state.prepare(model, args, kwargs)
    spec, trace, _ = specialise(model, state.base_cls, state.rule, inputs, positional)
    return model, spec, trace


def test_each_block_calls_its_template_function():
    model, spec, trace = _specialised()
    blocks, vace_blocks = len(model.blocks), len(model.vace_blocks)
    model_code = spec.code[spec.code.index("def forward("):]
    assert spec.code.count("def surgery_template_") >= 2
    groups = find_instances(spec.graph, trace.calls)
    members = {members[0].module_path: [m.module_path for m in members] for members in groups}
    # Two functions for the main blocks: with the rule's injection moved in after the block, and without.
    assert members["blocks.0"] == ["blocks.0", "blocks.2"] and members["blocks.1"] == ["blocks.1", "blocks.3"]
    assert len(members.get("vace_blocks.1", [1])) == vace_blocks - 1  # VACE block 0 has before_proj: its own code
    calls = [line for line in model_code.splitlines() if "surgery_template_0(" in line or "surgery_template_1(" in line]
    assert len(calls) == blocks and "(blocks_3, " in calls[3]
    # The flat graph keeps every block's own nodes for matching, reports and validation.
    assert any(n.op == "call_module" and n.target == f"blocks.{blocks - 1}.self_attn" for n in spec.graph.nodes)


def test_a_side_effect_inside_a_body_keeps_that_block_inline():
    model, spec, trace = _specialised()
    graph = spec.graph
    groups = find_instances(graph, trace.calls)
    second = next(m for m in groups if m[0].module_path == "blocks.1")[1]
    assert second.module_path == "blocks.3"
    middle = second.body[len(second.body) // 2]
    with graph.inserting_before(middle):
        graph.call_method("add_", (second.outputs[0], 1.0))  # an in-place write amid the body
    sizes = {m[0].module_path: [i.module_path for i in m] for m in find_instances(graph, trace.calls)}
    assert "blocks.1" not in sizes and all("blocks.3" not in m for m in sizes.values())
    assert sizes["blocks.0"] == ["blocks.0", "blocks.2"]
