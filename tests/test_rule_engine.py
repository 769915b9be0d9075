"""The rule engine's parts on small models written here: patterns built by hand, how the
matcher selects (every match or one chain, at which depth), each ``Where``, and grafts at
nested paths. Every numeric check is exact (max abs diff 0.0) against the same computation
written by hand with PyTorch hooks."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import surgery
from report_fakes import DIM, Tiny
from surgery.errors import GraftError, MatchError, RuleError
from surgery.matching.pattern import (ATTENTION_BLOCK, FEED_FORWARD, Pattern, feed_forward, is_feed_forward,
                                      shape_preserving)
from surgery.rule import GraftContext, Rule, Site, Where
from surgery.tracing.policy import TracePolicy

HIDDEN = 16


# ---- small models -------------------------------------------------------------------------

def _ffn() -> nn.Sequential:
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM))


class Block(nn.Module):
    """``x + ffn(h) + h`` with ``h = norm(x)``: the FFN's input is read outside it too."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.ffn = _ffn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.ffn(h) + h


class Net(Tiny):
    """Three identical blocks (the tracer traces the first and replays the others) between
    an embedding and a head."""

    def __init__(self, blocks: int = 3) -> None:
        super().__init__(blocks)
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))


class Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Deep(nn.Module):
    """Blocks two levels down, inside stages, plus a lone FFN at the top level."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(Stage() for _ in range(2))
        self.ffn = _ffn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.ffn(x)


class Counted(nn.Module):
    """An FFN that also counts its calls in a buffer (a side effect a rewrite must keep)."""

    def __init__(self) -> None:
        super().__init__()
        self.ffn = _ffn()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.add_(1)
        return self.ffn(x), x.sum(-1)


class CountedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unit = Counted()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, total = self.unit(x)
        return y * 2 + total.unsqueeze(-1)


def _built(cls: type, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rule(pattern: Pattern, actions=(), grafts=None, expected=None, count_option=None, name="test") -> Rule:
    return Rule(name=name, options={}, pattern=pattern, expected=expected,
                assign=lambda position, count: position, grafts=grafts or (lambda context: {}),
                actions=tuple(actions), inputs={}, check_call=lambda inputs, call, latent, model: {},
                trace_policy=TracePolicy(), count_option=count_option)


def _apply(model: nn.Module, rule: Rule, x: torch.Tensor, **kwargs) -> surgery.ApplyResult:
    return surgery.apply(model, rule, example_inputs=((x,), {}), **kwargs)


def _exact(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


def _ffn_paths(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if name.endswith("ffn")]


# ---- patterns and selection -------------------------------------------------------------------

def test_an_is_check_matches_every_ffn_at_any_depth_in_execution_order():
    x = _x(2, 5, DIM)
    result = _apply(_built(Deep), _rule(FEED_FORWARD), x, dry_run=True)
    names = [m.name for m in result.matches]
    # The blocks after the first of each stage (and the whole second stage) are replays.
    assert names == ["stages.0.blocks.0.ffn", "stages.0.blocks.1.ffn", "stages.1.blocks.0.ffn",
                     "stages.1.blocks.1.ffn", "ffn"]
    assert [m.position for m in result.matches] == [0, 1, 2, 3, 4]


def test_a_contains_check_selecting_all_refuses_nested_matches_and_names_the_fix():
    contains = Pattern("has an FFN", (("shape", shape_preserving), ("feed-forward", feed_forward)))
    with pytest.raises(MatchError) as caught:
        _apply(_built(Net), _rule(contains), _x(2, 5, 4), dry_run=True)
    message = str(caught.value)
    assert "matched blocks.0.ffn and also blocks.0, which runs it" in message
    assert "is_feed_forward" in message and "select='chain'" in message


def test_a_chain_keeps_the_outermost_depth_and_one_chain():
    contains = Pattern("has an FFN", (("shape", shape_preserving), ("feed-forward", feed_forward)), select="chain")
    result = _apply(_built(Net), _rule(contains), _x(2, 5, 4), dry_run=True)
    assert [m.name for m in result.matches] == ["blocks.0", "blocks.1", "blocks.2"]
    deep = _apply(_built(Deep), _rule(contains), _x(2, 5, DIM), dry_run=True)
    # Depth 0 holds the stages (which contain FFNs) and the lone FFN, which all chain; the
    # blocks and FFNs inside the stages are deeper.
    assert [m.name for m in deep.matches] == ["stages.0", "stages.1", "ffn"]


def test_attention_block_still_selects_a_chain():
    assert ATTENTION_BLOCK.select == "chain"
    assert FEED_FORWARD.select == "all"


def test_a_pattern_refuses_an_unknown_selection():
    with pytest.raises(RuleError, match=r"select='every'.*; fix: use one of 'all', 'chain'"):
        Pattern("x", (), select="every")


def test_a_wrong_count_names_the_rules_own_option_and_the_nearest_candidates():
    with pytest.raises(MatchError) as caught:
        _apply(_built(Net), _rule(FEED_FORWARD, expected=lambda model: 4, count_option="num_ffns"), _x(2, 5, 4))
    message = str(caught.value)
    assert "rule 'test' expected 4 feed-forward unit(s) but matched 3" in message
    # A block contains an FFN but is not one: its own output is a residual add.
    assert ("nearest partial matches: blocks.0 (Block) passed 1/2, failed 'is Linear -> activation -> Linear': "
            "the output is not computed by a Linear of this call") in message
    assert "if the model has 3 such feed-forward units, set the rule's num_ffns option to 3" in message
    assert "num_layers" not in message
    with pytest.raises(MatchError, match="rule 'test' expects another count and has no option to change it"):
        _apply(_built(Net), _rule(FEED_FORWARD, expected=lambda model: 2), _x(2, 5, 4))


# ---- where actions go -----------------------------------------------------------------------

def _hooked(model: nn.Module, hook=None, pre_hook=None) -> nn.Module:
    for path in _ffn_paths(model):
        ffn = model.get_submodule(path)
        if hook is not None:
            ffn.register_forward_hook(hook)
        if pre_hook is not None:
            ffn.register_forward_pre_hook(pre_hook)
    return model


def test_before_first_runs_once_and_after_each_rewires_every_later_reader():
    def keep_input(site: Site) -> None:
        site.scratch["first"] = site.stream * 0.25

    def add_it(site: Site):
        return site.stream + site.scratch["first"].mean()

    x = _x(2, 5, 4)
    model = _built(Net)
    result = _apply(model, _rule(FEED_FORWARD, [(Where.BEFORE_FIRST, keep_input), (Where.AFTER_EACH, add_it)]), x)
    first_input = {}

    def remember(module, args):
        first_input.setdefault("x", args[0] * 0.25)

    reference = _hooked(_built(Net), hook=lambda m, a, out: out + first_input["x"].mean(), pre_hook=remember)
    assert _exact(result.module(x), reference(x)) == 0.0
    assert _exact(result.module(x), model(x)) > 0.0


def test_before_each_replaces_the_units_input_for_the_unit_only():
    x = _x(2, 5, 4)
    model = _built(Net)
    result = _apply(model, _rule(FEED_FORWARD, [(Where.BEFORE_EACH, lambda site: site.stream * 0.5)]), x)
    # The block's ``+ h`` still reads the original h: only the FFN sees the halved input.
    reference = _hooked(_built(Net), pre_hook=lambda m, args: (args[0] * 0.5,))
    assert _exact(result.module(x), reference(x)) == 0.0
    assert _exact(result.module(x), model(x)) > 0.0
    # The base graph (rebuilt for reports) is the traced model without the rule's nodes.
    traced = _apply(model, _rule(FEED_FORWARD), x, dry_run=True).base_graph
    assert [n.op for n in result.base_graph.nodes] == [n.op for n in traced.nodes]


def test_replace_swaps_the_unit_for_a_graft_and_drops_its_unused_nodes():
    def grafts(context: GraftContext) -> dict[str, nn.Module]:
        torch.manual_seed(5)
        return {f"{m.name}_swap": nn.Linear(DIM, DIM) for m in context.matches}

    def swap(site: Site):
        return site.module(f"{site.match.name}_swap")(site.stream)

    x = _x(2, 5, 4)
    model = _built(Net)
    result = _apply(model, _rule(FEED_FORWARD, [(Where.REPLACE, swap)], grafts), x)
    reference = _built(Net)
    for path in _ffn_paths(reference):
        parent, _, leaf = path.rpartition(".")
        setattr(reference.get_submodule(parent), leaf, result.module.get_submodule(f"{path}_swap"))
    assert _exact(result.module(x), reference(x)) == 0.0
    targets = {n.target for n in result.graph.nodes if n.op == "call_module"}
    assert not any(".ffn." in t for t in targets), targets  # the FFNs' layers no longer run
    assert {f"blocks.{i}.ffn_swap" for i in range(3)} <= targets
    base_targets = {n.target for n in result.base_graph.nodes if n.op == "call_module"}
    assert {f"blocks.{i}.ffn.0" for i in range(3)} <= base_targets and not any("swap" in t for t in base_targets)


def test_replace_keeps_side_effects_and_needs_the_outputs_shape():
    unit = Pattern("counted unit", (("shape", shape_preserving),
                                    ("named unit", lambda view: None if view.qualname == "unit" else "another call")))

    def halve(site: Site):
        y, total = site.output
        return (site.stream * 0.5, total)

    x = _x(2, 3, DIM)
    model = _built(CountedNet)
    result = _apply(model, _rule(unit, [(Where.REPLACE, halve)]), x)
    before = float(result.module.unit.calls)
    out = result.module(x)
    assert float(result.module.unit.calls) == before + 1  # the in-place count survived the replacement
    assert _exact(out, (x * 0.5) * 2 + x.sum(-1).unsqueeze(-1)) == 0.0
    assert not any(n.op == "call_module" and n.target.startswith("unit.ffn") for n in result.graph.nodes)

    with pytest.raises(RuleError, match=r"replaced the output of unit with a value of another structure \(1 values "
                                        r"for 2\); fix: return a value shaped like site.output"):
        _apply(_built(CountedNet), _rule(unit, [(Where.REPLACE, lambda site: site.stream)]), x)


# ---- grafts at any path --------------------------------------------------------------------

def _graft_at(*paths: str):
    def grafts(context: GraftContext) -> dict[str, nn.Module]:
        return {path: nn.Linear(DIM, DIM) for path in paths}
    return grafts


def test_a_graft_at_a_nested_path_has_native_keys_is_traced_and_leaves_the_input_alone():
    def use(site: Site):
        return site.stream + site.module("blocks.1.extra")(site.stream) if site.match.position == 1 else None

    x = _x(2, 5, 4)
    model = _built(Net)
    keys = set(model.state_dict())
    result = _apply(model, _rule(FEED_FORWARD, [(Where.AFTER_EACH, use)], _graft_at("blocks.1.extra")), x)
    assert set(result.module.state_dict()) - keys == {"blocks.1.extra.weight", "blocks.1.extra.bias"}
    assert set(model.state_dict()) == keys and not hasattr(model.blocks[1], "extra")
    assert [g.name for g in result.grafted] == ["blocks.1.extra"]
    extra = result.module.blocks[1].extra
    with torch.no_grad():
        extra.weight.copy_(torch.randn(DIM, DIM))
    reference = _built(Net)
    reference.blocks[1].ffn.register_forward_hook(lambda m, a, out: out + extra(out))
    assert _exact(result.module(x), reference(x)) == 0.0
    # A new trace (here forced) traces the rewritten model, the graft in it.
    result.module.surgery_state.clear()
    y = _x(3, 7, 4, seed=2)
    assert _exact(result.module(y), reference(y)) == 0.0
    assert len(result.module.surgery_state.specialisations) == 1


@pytest.mark.parametrize("path, problem", [
    ("blocks.7.extra", "grafts 'blocks.7.extra', but the model has no module 'blocks.7'"),
    ("blocks.1.ffn", "grafts 'blocks.1.ffn', but 'blocks.1' already has an attribute 'ffn'"),
    ("blocks.extra", "grafts 'blocks.extra' into the container 'blocks' (ModuleList)"),
    ("head", "grafts 'head', but the model already has an attribute 'head'"),
])
def test_a_graft_needs_a_free_name_under_an_existing_non_container_parent(path, problem):
    model = _built(Net)
    with pytest.raises(GraftError, match=re.escape(problem)):
        _apply(model, _rule(FEED_FORWARD, grafts=_graft_at(path)), _x(2, 5, 4))
    assert not hasattr(model.blocks[1], "extra")


def test_a_rule_value_that_is_not_traced_is_refused():
    with pytest.raises(RuleError, match="returned float at blocks.0.ffn where a traced value was replaced"):
        _apply(_built(Net), _rule(FEED_FORWARD, [(Where.AFTER_EACH, lambda site: 1.0)]), _x(2, 5, 4))



def test_an_evicted_specialisation_is_freed_while_the_apply_result_lives():
    """``ApplyResult`` keeps its graphs, not the specialisation (which holds code and a recheck
    twin), so the bounded cache really frees what it evicts."""
    import gc
    import weakref

    model = _built(Net)
    result = _apply(model, _rule(FEED_FORWARD, [(Where.AFTER_EACH, lambda site: site.stream * 2.0)]), _x(2, 5, 4))
    state = result.module.surgery_state
    state.limit = 1
    first = weakref.ref(next(iter(state.specialisations.values())))
    x = _x(5, 4)  # another rank: a new specialisation, which evicts the first
    assert _exact(result.module(x), _hooked(_built(Net), hook=lambda m, a, out: out * 2.0)(x)) == 0.0
    assert state.evictions == 1
    gc.collect()
    assert first() is None
    assert len(result.base_graph.nodes) > 0  # the result still offers the traced base graph
