"""Family facts are data: VACE profiles, their detection, and constructor settings read back
from a block (attributes, a config, or its structure; never a silent default)."""
from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import torch
import torch.nn as nn

from examples import PIPELINES
from rules import vace
from rules.vace.profiles import FALLBACK, PROFILES, WAN, detect, resolve
from surgery.errors import GraftError, RuleError
from surgery.grafting.settings import constructor_arguments, structure_difference, structure_of

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", list(PIPELINES))
def test_streaming_stand_ins_are_the_wan_family(name):
    assert detect(PIPELINES[name].build("tiny", seed=0)) is WAN


def test_unknown_model_gets_the_original_layout_and_names_resolve():
    assert detect(nn.Linear(2, 2)) is FALLBACK
    assert resolve("wan") is WAN and resolve(WAN) is WAN
    with pytest.raises(RuleError, match=r"unknown VACE profile 'comfy'; fix: use one of 'diffusers', 'wan'"):
        vace.rule(profile="comfy")


def test_rule_without_profile_binds_to_the_detected_family():
    rule = vace.rule(vace_layers=[0, 2])
    assert rule.bind is not None and rule.options["profile"] is None
    bound = rule.bind(rule, PIPELINES["longlive"].build("tiny", seed=0))
    assert bound.bind is None and bound.options["profile"] == "wan"
    assert set(bound.inputs) == {"vace_context", "vace_context_scale"}
    grafts = lambda context: {}  # noqa: E731 - a field replaced on the unbound rule survives binding
    assert rule.bind(dataclasses.replace(rule, grafts=grafts), nn.Linear(2, 2)).grafts is grafts


def test_rule_code_and_engine_name_no_model_family():
    families = re.compile(r"CausalWan|longlive|krea|memflow|streamdiffusion|reward.?forcing|kv_cache|"
                          r"crossattn_cache|kv_bank|t2v_cross_attn", re.IGNORECASE)
    files = [ROOT / "rules" / "vace" / f"{name}.py" for name in ("rule", "inputs", "config")] + [p for d in ("grafting", "matching", "rewriting", "tracing")
                                            for p in (ROOT / "surgery" / d).glob("*.py")]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if families.search(line)]
    assert hits == []


class Norm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class Block(nn.Module):
    """Keeps none of its settings; ``cross_norm``'s default would build a different block."""

    def __init__(self, width: int, heads: int, cross_norm: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.norm = Norm(width, eps) if cross_norm else nn.Identity()


def test_settings_found_by_attribute_config_or_structure():
    block = Block(8, 2, cross_norm=True, eps=1e-5)
    solved = constructor_arguments(block)
    assert solved == {"width": 8, "heads": 2, "cross_norm": True, "eps": 1e-5}
    assert constructor_arguments(block, overrides={"heads": 4})["heads"] == 4

    class Model(nn.Module):
        config = {"width": 8, "heads": 2, "cross_norm": True}

    assert constructor_arguments(block, Model(), sources=("attributes", "config")) == \
        {"width": 8, "heads": 2, "cross_norm": True, "eps": 1e-5}


def test_a_setting_no_source_yields_is_an_error_naming_it():
    block = Block(8, 2, cross_norm=True)
    with pytest.raises(GraftError, match=r"'width', 'heads', 'cross_norm' are not found in the attributes"):
        constructor_arguments(block, sources=("attributes",))
    block.norm.weight = nn.Parameter(torch.ones(3))  # no setting rebuilds this structure
    with pytest.raises(GraftError, match=r"no candidate values rebuild its structure .*closest, with width=8, heads=2, cross_norm=True: norm.weight has shape \[8\], the module has \[3\]"):
        constructor_arguments(block)


def test_structure_difference_names_the_first_difference():
    a, b = Block(8, 2, cross_norm=True), Block(8, 2, cross_norm=False)
    assert structure_difference(structure_of(a), structure_of(a)) is None
    assert structure_difference(structure_of(b), structure_of(a)) == "norm is Identity, the module has Norm"
