"""Small fx graphs and a fake ``ApplyResult`` for the report and CLI tests.

``Tiny`` is a three-block stand-in; ``TinyBranch`` is the same model with a hand-written
two-block control branch whose hints are added after blocks 0 and 2. Tracing
``TinyBranch`` and tagging its nodes the way the engine does (``meta["surgery"]``) gives
a rewritten graph without needing the engine.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

DIM = 8


class Block(nn.Module):
    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


class DoubledBlock(Block):
    """``Block`` with one extra op: what a test adds to "a stand-in block"."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * 2.0
        return x + self.ffn(h)


class Tiny(nn.Module):
    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.head = nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class TinyBranch(Tiny):
    """``Tiny`` plus a control branch (``vace_embed``, ``vace_blocks``) injected after blocks 0 and 2."""

    hint_layers = (0, 2)

    def __init__(self, layers: int = 3) -> None:
        super().__init__(layers)
        self.vace_embed = nn.Linear(6, DIM)
        self.vace_blocks = nn.ModuleList(Block() for _ in self.hint_layers)

    def forward(self, x: torch.Tensor, vace_context: torch.Tensor) -> torch.Tensor:
        c = self.vace_embed(vace_context)
        hints = []
        for vb in self.vace_blocks:
            c = vb(c)
            hints.append(c * 0.5)
        x = self.embed(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.hint_layers:
                x = x + hints[self.hint_layers.index(i)]
        return self.head(x)


def _depends_on(graph: fx.Graph, source: fx.Node) -> set[fx.Node]:
    reached = {source}
    for node in graph.nodes:
        if any(i in reached for i in node.all_input_nodes):
            reached.add(node)
    return reached


def tag_branch(graph: fx.Graph, rule: str = "vace") -> fx.Graph:
    """Tag nodes like the engine: the branch (depends only on ``vace_context``) and the injection adds."""
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    from_ctx = _depends_on(graph, placeholders["vace_context"])
    from_x = _depends_on(graph, placeholders["x"])
    index = 0
    for node in graph.nodes:
        if node.op == "placeholder" or node.op == "output":
            continue
        if node in from_ctx and node not in from_x:
            node.meta["surgery"] = {"rule": rule, "role": "branch", "index": None}
        elif node.op == "call_function" and node.target is operator.add and any(
            i in from_ctx and i not in from_x for i in node.all_input_nodes
        ):
            node.meta["surgery"] = {"rule": rule, "role": "inject", "index": index}
            index += 1
    return graph


def trace(module: nn.Module) -> fx.GraphModule:
    return fx.symbolic_trace(module)


@dataclass(frozen=True)
class FakeMatch:
    name: str
    cls: str
    position: int
    index: int | None


@dataclass(frozen=True)
class FakeGrafted:
    name: str
    params: int
    shapes: dict[str, tuple] = field(default_factory=dict)


@dataclass(frozen=True)
class FakeGuard:
    kind: str
    expr: str
    value: str
    where: str


@dataclass
class FakeRule:
    name: str = "vace"
    options: dict[str, Any] = field(default_factory=lambda: {"vace_in_dim": 6, "vace_layers": (0, 2)})


@dataclass
class FakeResult:
    module: nn.Module
    rule: Any
    model_name: str
    matches: list
    grafted: list
    guards: list
    graph: fx.Graph | None
    base_graph: fx.Graph
    timings: dict[str, float] = field(default_factory=dict)


def fake_result(rule: Any = None, module: nn.Module | None = None) -> FakeResult:
    """A complete fake ``ApplyResult`` for ``TinyBranch`` over ``Tiny``."""
    torch.manual_seed(0)
    base = Tiny()
    rewritten = module if module is not None else TinyBranch()
    graph = tag_branch(trace(rewritten).graph)
    grafted = [
        FakeGrafted(name, sum(p.numel() for p in rewritten.get_submodule(name).parameters()))
        for name in ("vace_embed", "vace_blocks.0", "vace_blocks.1")
    ]
    layers = getattr(rewritten, "hint_layers", (0, 2))
    return FakeResult(
        module=rewritten,
        rule=rule if rule is not None else FakeRule(),
        model_name="Tiny",
        matches=[FakeMatch(f"blocks.{i}", "Block", i, layers.index(i) if i in layers else None) for i in range(3)],
        grafted=grafted,
        guards=[FakeGuard("shape", "x.shape[1]", "5", "report_fakes.py:1")],
        graph=graph,
        base_graph=trace(base).graph,
        timings={"trace_s": 0.01, "match_s": 0.001, "apply_s": 0.02},
    )
