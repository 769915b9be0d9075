"""VACE as a surgery rule.

VACE adds a parallel branch to a Wan transformer: ``vace_patch_embedding`` turns the
control context into tokens, ``vace_blocks.K`` (the model's own block structure, run
without caches) turn them into one hint per selected layer, and the output of main block
``vace_layers[k]`` becomes ``x + hint_k * scale_k``. The whole branch runs before the first
block because it only reads the patch-embedded latent ``x0`` and the blocks' shared inputs.
Several control contexts in one call each run through the same branch, and their hints are
added one context after another (:mod:`rules.vace.inputs` says which call forms mean that).

Nothing here names a pipeline or a model family: blocks are found by structure, their
constructor arguments are read back from the blocks (their attributes, a config, their
structure), and the cache-free call passes only the arguments the block's ``forward``
requires (every optional argument, caches included, keeps its default). What differs
between families (input names, projection names, caches, where settings live) is data in
:mod:`rules.vace.profiles`; ``rule()`` detects the family of the model it is applied to.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn as nn

from surgery.errors import RuleError
from surgery.grafting.build import allocate, rebuild_like, skipped_init, zero_linear
from surgery.matching.pattern import ATTENTION_BLOCK
from surgery.rule import GraftContext, Rule, Site, Where
from surgery.tracing.policy import TracePolicy

from .config import OPTIONS, check_layers
from .inputs import check_inputs, normalise_scale
from .lora_keys import lora_schemes, model_layers
from .profiles import FALLBACK, PROFILES, VaceProfile, detect, resolve
from .weights import weight_checks

NAME = "vace"

def rule(vace_in_dim: int = 96, vace_layers: Sequence[int] | None = None, num_layers: int | None = None,
         profile: str | VaceProfile | None = None) -> Rule:
    """A VACE control branch: hints from a control context added after the chosen main blocks.

    Args:
        vace_in_dim: channels of the control context.
        vace_layers: sorted, unique block indices containing 0; ``None`` selects every
            second block once the block count is known.
        num_layers: the number of blocks to expect; ``None``: the count the model declares
            (its profile's ``block_count``), else whatever the pattern matches.
        profile: the model family (:mod:`rules.vace.profiles`): a built-in name or a
            ``VaceProfile``; ``None`` detects it when the rule is applied.

    Raises:
        RuleError: on invalid options (at construction, or at apply time for a range that
            depends on the model's block count).
    """
    if not isinstance(vace_in_dim, int) or isinstance(vace_in_dim, bool) or vace_in_dim <= 0:
        raise RuleError(f"vace_in_dim must be a positive integer, got {vace_in_dim!r}", "use 96 (the VACE default)")
    if num_layers is not None and (not isinstance(num_layers, int) or num_layers <= 0):
        raise RuleError(f"num_layers must be a positive integer, got {num_layers!r}", "omit it to read the model's")
    layers = check_layers(vace_layers, num_layers)
    family = resolve(profile) if profile is not None else FALLBACK

    def resolved(count: int) -> tuple[int, ...]:
        chosen = layers if layers is not None else tuple(range(0, count, 2))
        check_layers(chosen, count)
        return chosen

    def expected(model: nn.Module) -> int | None:
        count = num_layers if num_layers is not None else family.declared_count(model)
        if count is not None:
            resolved(count)
        return count

    def assign(position: int, count: int) -> int | None:
        chosen = resolved(count)
        return chosen.index(position) if position in chosen else None

    def grafts(context: GraftContext) -> dict[str, nn.Module]:
        embedder = context.stream_source
        block = context.matched_modules[0]
        if not isinstance(embedder, (nn.Conv3d, nn.Conv2d)):
            raise RuleError(f"the residual stream is not produced by a convolutional patch embedding "
                            f"(found {type(embedder).__name__})", "VACE needs a Wan-style patch embedding")
        weight = embedder.weight
        dim = embedder.out_channels
        with torch.device("meta"), skipped_init():
            conv = type(embedder)(vace_in_dim, dim, kernel_size=embedder.kernel_size, stride=embedder.stride)
        conv = _allocate_like(conv, weight, context.init)
        count = len(resolved(len(context.matches)))
        blocks = nn.ModuleList()
        for k in range(count):
            fresh = rebuild_like(block, root=context.model, overrides=family.block_overrides, init=context.init,
                                 sources=family.block_settings)
            if k == 0:
                setattr(fresh, family.input_projection, zero_linear(dim, device=weight.device, dtype=weight.dtype))
            setattr(fresh, family.output_projection, zero_linear(dim, device=weight.device, dtype=weight.dtype))
            blocks.append(fresh)
        return {family.patch_embedding: conv, family.blocks: blocks}

    def layer_count(model: nn.Module) -> int | None:
        """VACE layers of ``model``: its grafted blocks, else from its block count or the
        given layers; ``None`` while the default layers wait for the match count."""
        grafted = getattr(model, family.blocks, None)
        if grafted is not None:
            return len(grafted)
        count = expected(model)
        if count is not None:
            return len(resolved(count))
        return len(layers) if layers is not None else None

    def check_call(inputs: dict[str, Any], call_inputs: dict[str, Any], latent: Any,
                   model: nn.Module) -> dict[str, Any]:
        return check_inputs(inputs, latent, model, family, vace_in_dim, layer_count(model))

    def example(latent: Any, model: nn.Module) -> dict[str, Any]:
        if not isinstance(latent, torch.Tensor) or latent.dim() != 5:
            return {family.context_input: None, family.scale_input: 1.0}
        b, _, f, h, w = latent.shape
        return {family.context_input: latent.new_zeros(b, vace_in_dim, f, h, w), family.scale_input: 1.0}

    def bind(current: Rule, model: nn.Module) -> Rule:
        bound = rule(vace_in_dim, vace_layers, num_layers, profile=detect(model).name)
        # Fields replaced on this rule (dataclasses.replace) win over the family's.
        replaced = {f.name: getattr(current, f.name) for f in dataclasses.fields(Rule)
                    if f.name != "bind" and getattr(current, f.name) is not getattr(unbound, f.name)}
        return dataclasses.replace(bound, **replaced)

    unbound = Rule(
        name=NAME,
        options={"vace_in_dim": vace_in_dim, "vace_layers": list(layers) if layers is not None else None,
                 "num_layers": num_layers, "profile": _option(profile)},
        pattern=ATTENTION_BLOCK,
        expected=expected,
        assign=assign,
        grafts=grafts,
        actions=_actions(family),
        inputs={family.context_input: None, family.scale_input: 1.0},
        check_call=check_call,
        trace_policy=TracePolicy(cache_arguments=family.leaf_arguments),
        key_maps=dict(family.key_maps),
        weight_prefixes=(f"{family.blocks}.", f"{family.patch_embedding}."),
        example=example,
        bind=bind if profile is None else None,
        count_option="num_layers",
        lora_schemes=lambda model: lora_schemes(model_layers(model), family.blocks),
        check_weights=weight_checks(patch_embedding=family.patch_embedding, blocks=family.blocks,
                                    diffusers_fix="diffusers" in family.key_maps),
    )
    return unbound


def _option(profile: str | VaceProfile | None) -> str | VaceProfile | None:
    """The ``profile`` option as reported and saved: a built-in profile by its name."""
    if isinstance(profile, VaceProfile) and PROFILES.get(profile.name) == profile:
        return profile.name
    return profile


def _allocate_like(module: nn.Module, like: torch.Tensor, init: str) -> nn.Module:
    if like.device.type == "meta":
        return module
    return allocate(module, device=like.device, dtype=like.dtype, init=init)


def _actions(family: VaceProfile) -> tuple[tuple[Where, Any], ...]:
    def hints(site: Site) -> None:
        return compute_hints(site, family)

    def inject(site: Site) -> Any:
        return inject_hint(site, family)

    return (Where.BEFORE_FIRST, hints), (Where.AFTER_EACH, inject)


def compute_hints(site: Site, family: VaceProfile = FALLBACK) -> None:
    """Before the first block: context -> tokens -> VACE blocks -> one hint per layer, for each context.

    Several contexts arrive as ``(context, per-layer scales)`` pairs with the scale input
    ``None`` (:mod:`rules.vace.inputs`); each runs through the same VACE branch on its own.
    """
    context = site.inputs[family.context_input]
    if context is None:
        return None
    if site.inputs[family.scale_input] is None:
        site.scratch["contexts"] = [(branch_hints(site, pair[0], family), pair[1]) for pair in context]
    else:
        site.scratch["hints"] = branch_hints(site, context, family)
    return None


def branch_hints(site: Site, context: Any, family: VaceProfile = FALLBACK) -> list[Any]:
    """The VACE branch on one context: its hints, one per VACE layer."""
    model, x0 = site.model, site.stream
    embed, blocks = getattr(model, family.patch_embedding), getattr(model, family.blocks)
    tokens = x0.size(1)
    if family.batched_embedding:
        # One convolution over the whole batch: per-element convolutions round differently.
        batch = torch.stack([item.to(embed.weight.dtype) for item in context])
        c = _padded(embed(batch).flatten(2).transpose(1, 2), len(batch), tokens)
    else:
        pieces = []
        for item in context:
            c = embed(item.to(embed.weight.dtype).unsqueeze(0)).flatten(2).transpose(1, 2)
            pieces.append(_padded(c, 1, tokens))
        c = torch.cat(pieces)
    c = c[:, :tokens]
    hints = []
    for k, block in enumerate(blocks):
        if k == 0:
            c = getattr(block, family.input_projection)(c) + x0
        out = block(c, **site.required)
        c = out[0] if isinstance(out, (tuple, list)) else out
        hints.append(getattr(block, family.output_projection)(c))
    return hints


def _padded(c: torch.Tensor, rows: int, tokens: int) -> torch.Tensor:
    """Zero-pad short contexts to the chunk's tokens (long ones are cut after; vace.md 2.4 / 2.2)."""
    missing = tokens - c.size(1)
    pad = c.new_zeros(rows, missing if missing > 0 else 0, c.size(2))
    return torch.cat([c, pad], dim=1)


def inject_hint(site: Site, family: VaceProfile = FALLBACK) -> Any:
    """After block ``vace_layers[k]``: ``x + hint_k * scale_k`` (only x; cache info passes through).

    Several contexts are added one after another in their order, ``(x + h0_k * s0_k) + h1_k * s1_k
    ...``, as ComfyUI's ``VaceWanModel`` does (``x += c_skip * vace_strength[i]`` per context).
    """
    index = site.match.index
    if index is None:
        return None
    x = site.stream
    contexts = site.scratch.get("contexts")
    if contexts is not None:
        for hints, scale in contexts:
            x = x + hints[index][:, : x.size(1)] * scale[index]
        return x
    hints = site.scratch.get("hints")
    if hints is None:
        return None
    scale = site.inputs[family.scale_input]
    return x + hints[index][:, : x.size(1)] * scale[index]


__all__ = ["NAME", "OPTIONS", "branch_hints", "compute_hints", "inject_hint", "normalise_scale", "rule"]
