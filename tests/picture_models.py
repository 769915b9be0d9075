"""Models whose report pictures the tests draw: the real VACE rewrite of the LongLive stand-in, a
generic rule (an adapter after each block), and fx fakes with 40 blocks.

The real rewrites are built once per test session (about 2 s each on the tiny stand-in).
"""
from __future__ import annotations

import dataclasses
import re
from functools import lru_cache
from typing import Any

from torch import nn

from report_fakes import FakeMatch, TinyBranch, tag_branch, trace


@lru_cache(maxsize=None)
def longlive_vace() -> Any:
    """``surgery.apply`` of the VACE rule (vace_layers 0, 2) to the tiny LongLive stand-in."""
    import surgery
    from examples import PIPELINES
    from examples.driver import example_call
    from rules import vace

    pipeline = PIPELINES["longlive"]
    model = pipeline.build("tiny", seed=0)
    return surgery.apply(model, vace.rule(vace_in_dim=96), example_inputs=example_call(model, pipeline))


def adapter_rule() -> Any:
    """Not VACE: a Linear adapter after every matched block (``x + adapters[k](x)``), no index, no inputs."""
    from rules import vace
    from surgery.rule import Where

    def grafts(context: Any) -> dict[str, nn.Module]:
        dim = context.stream_source.out_channels
        return {"adapters": nn.ModuleList(nn.Linear(dim, dim) for _ in context.matches)}

    def after(site: Any) -> Any:
        return site.stream + site.model.adapters[site.match.position](site.stream)

    return dataclasses.replace(
        vace.rule(vace_in_dim=96), name="adapter", options={}, grafts=grafts, actions=((Where.AFTER_EACH, after),),
        inputs={}, check_call=lambda inputs, call_inputs, latent, model: {}, example=None, bind=None, key_maps={},
        weight_prefixes=("adapters.",), assign=lambda position, count: None)


@lru_cache(maxsize=None)
def longlive_adapters() -> Any:
    import surgery
    from examples import PIPELINES
    from examples.driver import example_call

    pipeline = PIPELINES["longlive"]
    model = pipeline.build("tiny", seed=0)
    return surgery.apply(model, adapter_rule(), example_inputs=example_call(model, pipeline))


def forty_blocks(every: int) -> tuple[Any, list[FakeMatch], list[str]]:
    """A 40-block fake with a hint after every ``every``-th block: (graph, matches, grafted names)."""

    class Forty(TinyBranch):
        hint_layers = tuple(range(0, 40, every))

    model = Forty(40)
    layers = model.hint_layers
    matches = [FakeMatch(f"blocks.{i}", "Block", i, layers.index(i) if i in layers else None) for i in range(40)]
    grafted = ["vace_embed"] + [f"vace_blocks.{k}" for k in range(len(layers))]
    return tag_branch(trace(model).graph), matches, grafted


def readme_pictures(text: str) -> list[str]:
    """The ```` ```mermaid ```` blocks GitHub draws in a Markdown text (not those quoted in ````` ```` ````` fences)."""
    pictures, quoted, current = [], False, None
    for line in text.splitlines():
        if current is not None:
            if line == "```":
                pictures.append("\n".join(current) + "\n")
                current = None
            else:
                current.append(line)
        elif line.startswith("````"):
            quoted = not quoted
        elif line == "```mermaid" and not quoted:
            current = []
    return pictures


_NODE = re.compile(r'^\s+(n\d+)(?:\(\["|\[/"|\[")(.*?)(?:"\]\)|"/\]|"\]):::(\w+)$')
_EDGE = re.compile(r"^\s+(n\d+) --> (n\d+)$")


@dataclasses.dataclass
class Picture:
    """A Mermaid picture read back: box labels (lines) and kinds by id, and edges by first label line."""

    text: str
    labels: dict[str, list[str]]
    kinds: dict[str, str]
    edges: list[tuple[str, str]]

    @property
    def names(self) -> set[tuple[str, str]]:
        return {(self.labels[a][0], self.labels[b][0]) for a, b in self.edges}

    def boxes(self, kind: str) -> list[list[str]]:
        return [self.labels[k] for k, v in self.kinds.items() if v == kind]


def read_picture(text: str) -> Picture:
    labels, kinds, edges = {}, {}, []
    for line in text.splitlines()[1:]:
        if node := _NODE.match(line):
            labels[node.group(1)] = node.group(2).split("<br/>")
            kinds[node.group(1)] = node.group(3)
        elif edge := _EDGE.match(line):
            edges.append((edge.group(1), edge.group(2)))
    return Picture(text, labels, kinds, edges)
