"""Shape-generic specialisations: a graph traced at one resolution serves others when every
Python decision it froze re-derives unchanged, bit-exact with the reference; guard state is
checked by identity once a full check has passed; the base graph is rebuilt on demand."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import surgery
from examples import PIPELINES
from examples.driver import compare, example_call, run_stream
from examples.reference import CausalVaceWanModel, load_vace_state_dict, random_vace_state_dict
from rules import vace
from surgery.reports.canonical import canonical_text
from surgery.tracing.policy import TracePolicy
from surgery.tracing.recheck import ShapeRecheck
from surgery.tracing.tracer import ExampleTracer
from surgery.tracing.twin import fake_inputs, fake_twin, new_fake_mode

RES_A, RES_B, RES_C = (64, 64), (48, 80), (32, 96)


def _pair(name: str):
    pipeline = PIPELINES[name]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline, height=RES_A[0], width=RES_A[1]))
    reference = CausalVaceWanModel(pipeline.build("tiny", seed=0))
    weights = random_vace_state_dict(reference, seed=5)
    load_vace_state_dict(reference, weights)
    result.module.load_state_dict(weights, strict=False)
    return pipeline, base, result, reference


def _context(pipeline, height: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, 96, pipeline.config.num_frame_per_block, height // 8, width // 8, generator=g)


@pytest.mark.parametrize("name", ["longlive", "streamdiffusionv2", "reward_forcing"])
def test_new_sizes_reuse_the_graph_bit_exact(name):
    pipeline, base, result, reference = _pair(name)
    model, state = result.module, result.module.surgery_state
    ours = run_stream(model, pipeline, chunks=3, height=RES_A[0], width=RES_A[1], vace_context=_context(pipeline, *RES_A))
    theirs = run_stream(reference, pipeline, chunks=3, height=RES_A[0], width=RES_A[1],
                        vace_context=_context(pipeline, *RES_A))
    assert compare(ours, theirs) == 0.0
    run_stream(model, pipeline, chunks=1, height=RES_A[0], width=RES_A[1])  # the VACE-off graph, too
    built = state.built
    for height, width in (RES_B, RES_C):
        ctx = _context(pipeline, height, width)
        ours = run_stream(model, pipeline, chunks=3, height=height, width=width, vace_context=ctx)
        theirs = run_stream(reference, pipeline, chunks=3, height=height, width=width, vace_context=ctx)
        assert compare(ours, theirs) == 0.0, (name, height, width)
        off = run_stream(model, pipeline, chunks=3, height=height, width=width)
        assert compare(off, run_stream(base, pipeline, chunks=3, height=height, width=width)) == 0.0
    assert state.built == built, state.reasons  # no new trace: the cached graphs served all sizes
    assert state.rechecks >= 2
    assert all(spec.guards.recheck is not None for spec in state.specialisations.values())


def test_tolist_of_shape_ints_gives_the_ints_back():
    # grid_sizes = torch.stack([torch.tensor(u.shape[2:]) for u in x]); grid_sizes.tolist() and
    # seq_lens[0].item() are the sizes themselves: graph arithmetic, no tensor-to-Python
    # conversion left in the graph (a compiled graph would break there).
    pipeline = PIPELINES["longlive"]
    base = pipeline.build("tiny", seed=0)
    result = surgery.apply(base, vace.rule(), example_inputs=example_call(base, pipeline))
    nodes = list(result.graph.nodes)
    assert not [n for n in nodes if n.op == "call_method" and n.target in ("tolist", "item")]
    unpatchify = next(n for n in nodes if n.op == "call_method" and n.target == "view" and len(n.args) == 8)
    assert all(isinstance(a, torch.fx.Node) for a in unpatchify.args[1:4]), unpatchify.args  # not literal sizes


class _Grid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = torch.tensor(x.shape[1:]) * 1  # computed from the sizes: no longer the ints themselves
        return x.view(*grid.tolist(), 1)


class _GridInPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = torch.tensor(x.shape[1:])
        grid.mul_(1)  # written in place: no longer (known to be) the ints it was built from
        return x.view(*grid.tolist(), 1)


def _trace(model: nn.Module, x: torch.Tensor):
    """The trace of ``model(x)`` on its fake twin, and the twin."""
    mode = new_fake_mode()
    root = fake_twin(model, mode)
    trace = ExampleTracer(TracePolicy()).trace_call(root, fake_inputs({"x": x}, mode),
                                                    lambda root_proxy, proxies: type(root).forward(root, proxies["x"]))
    return trace, root


@pytest.mark.parametrize("model", [_Grid, _GridInPlace])
def test_tolist_of_a_computed_shape_tensor_stays_graph_arithmetic(model):
    trace, _ = _trace(model(), torch.zeros(1, 3, 4))
    nodes = list(trace.graph.nodes)
    assert len([n for n in nodes if n.op == "call_method" and n.target == "tolist"]) == 1
    view = next(n for n in nodes if n.op == "call_method" and n.target == "view")
    assert all(isinstance(a, torch.fx.Node) for a in view.args[1:3]), view.args
    # Only the nesting of the list is guarded.
    assert [(c.convert, c.value) for c in trace.concretised] == [("structure", (None, None))]


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 2:  # a decision taken inside a module that is replayed
            return self.proj(x) * 2
        return self.proj(x)


class _TwoBranchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Branchy(), _Branchy()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_replayed_decisions_are_rechecked_for_each_copy():
    trace, root = _trace(_TwoBranchy(), torch.zeros(1, 3, 4))
    # blocks.1 replays blocks.0: its copy of the decision is recorded on its own node.
    assert [c.convert for c in trace.concretised] == ["bool", "bool"]
    assert trace.concretised[0].node is not trace.concretised[1].node
    recheck = ShapeRecheck(trace.graph, trace.concretised, trace.calls, root)
    assert recheck.first_failure({"x": torch.zeros(1, 5, 4)}) is None
    failure = recheck.first_failure({"x": torch.zeros(1, 2, 4)})
    assert failure.startswith("`if x.shape[1] > 2:") and failure.endswith(": False != traced True"), failure


def test_state_changes_are_seen_through_the_identity_snapshot():
    pipeline, base, result, reference = _pair("longlive")
    model, state = result.module, result.module.surgery_state
    args, kwargs = example_call(model, pipeline, vace_context=_context(pipeline, 32, 32), height=32, width=32)
    with torch.no_grad():
        first = model(*args, **kwargs)
        assert torch.equal(model(*args, **kwargs), first) and state.last_dispatch[0] == "cached"
    built = state.built
    # A plain attribute the traced code read: a new object, even of equal value, is a full check.
    norm = model.blocks[0].norm1
    norm.eps = float(str(norm.eps))
    with torch.no_grad():
        model(*args, **kwargs)
    assert state.built == built and state.last_dispatch[0] == "cached"
    norm.eps = 1e-3
    with torch.no_grad():
        model(*args, **kwargs)
    assert state.built == built + 1 and "blocks.0.norm1.eps" in state.reasons[-1]
    norm.eps = 1e-6
    # One it never read (the block keeps its settings, its code does not read them): no new graph.
    built = state.built
    model.blocks[0].eps = 1e-3
    with torch.no_grad():
        assert torch.equal(model(*args, **kwargs), first)
    assert state.built == built and state.last_dispatch[0] == "cached"
    # A swapped-in block is called by name: no new trace, and its weights are used.
    changed = copy.deepcopy(model.blocks[1])
    with torch.no_grad():
        changed.ffn[2].weight.mul_(2.0)
    built = state.built
    model.blocks[1] = changed
    with torch.no_grad():
        swapped = model(*args, **kwargs)
    assert state.built == built and not torch.equal(swapped, first)


def test_base_graph_is_the_traced_graph_before_the_rule():
    pipeline = PIPELINES["memflow"]
    base = pipeline.build("tiny", seed=0)
    call = example_call(base, pipeline)
    dry = surgery.apply(base, vace.rule(), example_inputs=call, dry_run=True)
    full = surgery.apply(base, vace.rule(), example_inputs=call)
    assert full._base_graph is None  # nothing is copied until asked
    rebuilt = canonical_text(full.base_graph)
    # The dry run traced without a context; the rebuilt graph keeps the rule's (unused) inputs.
    strip = lambda text: [line for line in text.splitlines() if "placeholder vace_context" not in line]  # noqa: E731
    assert not any("vace" in line for line in strip(rebuilt))
    assert strip(rebuilt) == strip(canonical_text(dry.base_graph))
