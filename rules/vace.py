"""VACE as a surgery rule.

VACE adds a parallel branch to a Wan transformer: ``vace_patch_embedding`` turns the
control context into tokens, ``vace_blocks.K`` (the model's own block structure, run
without caches) turn them into one hint per selected layer, and the output of main block
``vace_layers[k]`` becomes ``x + hint_k * scale_k``. The whole branch runs before the first
block because it only reads the patch-embedded latent ``x0`` and the blocks' shared inputs.

Nothing here names a pipeline or a model family: blocks are found by structure, their
constructor arguments are read back from the blocks (their attributes, a config, their
structure), and the cache-free call passes only the arguments the block's ``forward``
requires (every optional argument, caches included, keeps its default). What differs
between families (input names, projection names, caches, where settings live) is data in
:mod:`rules.vace_profiles`; ``rule()`` detects the family of the model it is applied to.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any, Sequence

import torch
import torch.nn as nn

from surgery.errors import CallError, RuleError
from surgery.grafting.build import allocate, rebuild_like, skipped_init, zero_linear
from surgery.matching.pattern import ATTENTION_BLOCK
from surgery.rule import CallCheck, GraftContext, Rule, Site, Where
from surgery.tracing.policy import TracePolicy

from .vace_profiles import FALLBACK, PROFILES, VaceProfile, detect, resolve

NAME = "vace"
# The names check_call speaks: the original layout's (other profiles' names are translated),
# and the grafted module names every built-in profile shares.
CONTEXT, SCALE = FALLBACK.context_input, FALLBACK.scale_input
PATCH_EMBEDDING = FALLBACK.patch_embedding
BLOCKS = FALLBACK.blocks

OPTIONS = {
    "vace_in_dim": "channels of the control context (96: 32 latent + 64 mask channels)",
    "vace_layers": "main blocks that receive a hint; must contain 0 (default: every second block)",
    "num_layers": "number of main blocks to expect (default: the count the model declares, else the match count)",
    "profile": f"model family: {', '.join(PROFILES)} or a rules.vace_profiles.VaceProfile (default: detected)",
}


def _check_layers(layers: Sequence[int] | None, num_layers: int | None) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise RuleError(f"vace_layers must be a list of block indices, got {layers!r}", "e.g. vace_layers=[0, 2, 4]")
    values = list(layers)
    if not values:
        raise RuleError("vace_layers is empty", "give at least [0], or None for every second block")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise RuleError(f"vace_layers must hold integers, got {values!r}", "e.g. vace_layers=[0, 2, 4]")
    if 0 not in values:
        raise RuleError(f"vace_layers {values} does not contain 0", "VACE block 0 must feed main block 0; add 0")
    if min(values) < 0:
        raise RuleError(f"vace_layers {values} has a negative index", "use indices 0..num_layers-1")
    if values != sorted(values):
        raise RuleError(f"vace_layers {values} is not sorted", f"use {sorted(set(values))}")
    if len(set(values)) != len(values):
        raise RuleError(f"vace_layers {values} has duplicates", f"use {sorted(set(values))}")
    if num_layers is not None and values[-1] >= num_layers:
        raise RuleError(f"vace_layers {values} is out of range for {num_layers} blocks",
                        f"use indices 0..{num_layers - 1}")
    return tuple(values)


def rule(vace_in_dim: int = 96, vace_layers: Sequence[int] | None = None, num_layers: int | None = None,
         profile: str | VaceProfile | None = None) -> Rule:
    """The VACE rule.

    Args:
        vace_in_dim: channels of the control context.
        vace_layers: sorted, unique block indices containing 0; ``None`` selects every
            second block once the block count is known.
        num_layers: the number of blocks to expect; ``None``: the count the model declares
            (its profile's ``block_count``), else whatever the pattern matches.
        profile: the model family (:mod:`rules.vace_profiles`): a built-in name or a
            ``VaceProfile``; ``None`` detects it when the rule is applied.

    Raises:
        RuleError: on invalid options (at construction, or at apply time for a range that
            depends on the model's block count).
    """
    if not isinstance(vace_in_dim, int) or isinstance(vace_in_dim, bool) or vace_in_dim <= 0:
        raise RuleError(f"vace_in_dim must be a positive integer, got {vace_in_dim!r}", "use 96 (the VACE default)")
    if num_layers is not None and (not isinstance(num_layers, int) or num_layers <= 0):
        raise RuleError(f"num_layers must be a positive integer, got {num_layers!r}", "omit it to read the model's")
    layers = _check_layers(vace_layers, num_layers)
    family = resolve(profile) if profile is not None else FALLBACK

    def resolved(count: int | None) -> tuple[int, ...]:
        if count is None:  # before matching, on a model that declares no count
            if layers is None:
                declared = " or ".join(family.block_count) or "none in its profile"
                raise RuleError(f"the model declares no block count ({declared}), so the default vace_layers "
                                f"cannot be chosen before tracing", "pass num_layers=... or vace_layers=[0, ...] "
                                "to the VACE rule")
            return layers
        chosen = layers if layers is not None else tuple(range(0, count, 2))
        _check_layers(chosen, count)
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
        embedder = context.stream_embedder
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

    def check_call(inputs: dict[str, Any], call_inputs: dict[str, Any], latent: Any,
                   model: nn.Module) -> dict[str, Any]:
        checked = _check_call(inputs, latent, vace_in_dim)
        grafted = getattr(model, BLOCKS, None)
        count = len(grafted) if grafted is not None else len(resolved(expected(model)))
        # Checked even without a context, so a bad scale fails on the first call, not later.
        scale = normalise_scale(inputs.get("vace_context_scale", 1.0), count, _branch_dtype(model, latent))
        if checked["vace_context"] is not None:
            checked["vace_context_scale"] = scale
        return checked

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
        check_call=_in_names_of(family, check_call),
        trace_policy=TracePolicy(cache_arguments=family.leaf_arguments),
        key_maps=dict(family.key_maps),
        weight_prefixes=(f"{family.blocks}.", f"{family.patch_embedding}."),
        example=example,
        bind=bind if profile is None else None,
    )
    return unbound


def _option(profile: str | VaceProfile | None) -> str | VaceProfile | None:
    """The ``profile`` option as reported and saved: a built-in profile by its name."""
    if isinstance(profile, VaceProfile) and PROFILES.get(profile.name) == profile:
        return profile.name
    return profile


def _in_names_of(family: VaceProfile, check: CallCheck) -> CallCheck:
    """``check`` speaks the original input names; let it take and return ``family``'s,
    and name them in its errors."""
    if (family.context_input, family.scale_input) == (CONTEXT, SCALE):
        return check
    inward = {family.context_input: CONTEXT, family.scale_input: SCALE}
    outward = {CONTEXT: family.context_input, SCALE: family.scale_input}

    def rename(text: str) -> str:
        return re.sub(rf"\b({SCALE}|{CONTEXT})\b", lambda m: outward[m.group(1)], text)

    def check_call(inputs: dict[str, Any], call_inputs: dict[str, Any], latent: Any,
                   model: nn.Module) -> dict[str, Any]:
        try:
            checked = check({inward.get(k, k): v for k, v in inputs.items()}, call_inputs, latent, model)
        except CallError as error:
            raise type(error)(rename(error.problem), rename(error.fix)) from error
        return {outward.get(k, k): v for k, v in checked.items()}

    return check_call


def _allocate_like(module: nn.Module, like: torch.Tensor, init: str) -> nn.Module:
    if like.device.type == "meta":
        return module
    return allocate(module, device=like.device, dtype=like.dtype, init=init)


def _branch_dtype(model: nn.Module, latent: Any) -> torch.dtype | None:
    """The dtype the hints are scaled in: the grafted branch's (the latent's before grafting)."""
    embed = getattr(model, PATCH_EMBEDDING, None)
    weight = getattr(embed, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.dtype
    return latent.dtype if isinstance(latent, torch.Tensor) and latent.is_floating_point() else None


def _check_call(inputs: dict[str, Any], latent: Any, vace_in_dim: int) -> dict[str, Any]:
    """Validate ``vace_context`` against the latent, normalise the scale to a tuple."""
    context, scale = inputs.get("vace_context"), inputs.get("vace_context_scale", 1.0)
    if context is None:
        return {"vace_context": None, "vace_context_scale": None}
    if isinstance(context, torch.Tensor) and context.dim() != 5:
        want = f"[{latent.shape[0]}, {vace_in_dim}, F, {latent.shape[3]}, {latent.shape[4]}]" \
            if isinstance(latent, torch.Tensor) and latent.dim() == 5 else f"[B, {vace_in_dim}, F, H, W]"
        raise CallError(f"vace_context has shape {tuple(context.shape)}, expected a batched {want} tensor "
                        f"for the latent of shape {tuple(latent.shape) if isinstance(latent, torch.Tensor) else '?'}",
                        "add the batch dimension (vace_context.unsqueeze(0)) or pass a list of [C, F, H, W] tensors")
    if not isinstance(context, (list, tuple, torch.Tensor)):
        raise CallError(f"vace_context must be a tensor or a list of tensors, got {type(context).__name__}",
                        "pass a [B, C, F, H, W] tensor")
    items = list(context)
    if not items:
        raise CallError("vace_context is empty", "pass a [B, C, F, H, W] tensor or one [C, F, H, W] tensor per batch "
                        "element, or vace_context=None to run without VACE")
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor) or item.dim() != 4:
            shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise CallError(f"vace_context[{i}] has shape {shape}, expected [channels, frames, height, width]",
                            "pass a [B, C, F, H, W] tensor or a list of [C, F, H, W] tensors")
        if not item.is_floating_point():
            raise CallError(f"vace_context[{i}] has dtype {item.dtype}, expected a floating-point tensor",
                            "pass the encoded control latents and masks as floats (they are cast to the model's dtype)")
        if item.shape[1] == 0:
            raise CallError(f"vace_context[{i}] of shape {tuple(item.shape)} has 0 frames",
                            "give at least one control frame (a shorter context is zero-padded)")
        if isinstance(latent, torch.Tensor) and latent.dim() == 5:
            want = (vace_in_dim, latent.shape[3], latent.shape[4])
            got = (item.shape[0], item.shape[2], item.shape[3])
            if got != want:
                raise CallError(
                    f"vace_context[{i}] of shape {tuple(item.shape)} does not fit the latent of shape "
                    f"{tuple(latent.shape)}: expected {vace_in_dim} channels and a {latent.shape[3]}x{latent.shape[4]} grid",
                    "encode the control frames at the latent's resolution with vace_in_dim channels")
    if isinstance(latent, torch.Tensor) and latent.dim() == 5 and len(items) != latent.shape[0]:
        raise CallError(f"vace_context has {len(items)} entries for a batch of {latent.shape[0]}",
                        "give one context per batch element")
    return {"vace_context": context, "vace_context_scale": scale}


_FLOAT_MAX = sys.float_info.max


def normalise_scale(scale: Any, count: int, dtype: torch.dtype | None = None) -> tuple[float, ...]:
    """A float (``None`` = 1.0) or one value per VACE layer, all finite (in ``dtype`` when given:
    the hints are scaled in the model's dtype, where 1e300 is inf for float32)."""
    if scale is None:
        scale = 1.0
    if isinstance(scale, torch.Tensor):
        scale = scale.tolist()
    values = [scale] * count if isinstance(scale, (int, float)) and not isinstance(scale, bool) else list(scale) \
        if isinstance(scale, (list, tuple)) else None
    if values is None:
        raise CallError(f"vace_context_scale must be a number or a sequence, got {type(scale).__name__}",
                        "pass a float or one float per VACE layer")
    if len(values) != count:
        raise CallError(f"vace_context_scale has {len(values)} values for {count} VACE layers",
                        f"pass a float or exactly {count} values")
    # A comparison, not math.isfinite: that raises OverflowError on an int such as 10**400.
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= _FLOAT_MAX for v in values):
        raise CallError(f"vace_context_scale {values} is not all finite numbers", "use finite floats")
    if dtype is not None and dtype.is_floating_point:
        largest = torch.finfo(dtype).max
        if any(abs(v) > largest for v in values):
            raise CallError(f"vace_context_scale {values} is not all finite numbers in the model's dtype {dtype} "
                            f"(largest {largest:.6g})", f"use floats of magnitude at most {largest:.6g}")
    return tuple(float(v) for v in values)


def _actions(family: VaceProfile) -> tuple[tuple[Where, Any], ...]:
    def hints(site: Site) -> None:
        return compute_hints(site, family)

    def inject(site: Site) -> Any:
        return inject_hint(site, family)

    return (Where.BEFORE_FIRST, hints), (Where.AFTER_EACH, inject)


def compute_hints(site: Site, family: VaceProfile = FALLBACK) -> None:
    """Before the first block: context -> tokens -> VACE blocks -> one hint per layer."""
    context = site.inputs[family.context_input]
    if context is None:
        return None
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
    site.scratch["hints"] = hints
    return None


def _padded(c: torch.Tensor, rows: int, tokens: int) -> torch.Tensor:
    """Zero-pad short contexts to the chunk's tokens (long ones are cut after; vace.md 2.4 / 2.2)."""
    missing = tokens - c.size(1)
    pad = c.new_zeros(rows, missing if missing > 0 else 0, c.size(2))
    return torch.cat([c, pad], dim=1)


def inject_hint(site: Site, family: VaceProfile = FALLBACK) -> Any:
    """After block ``vace_layers[k]``: ``x + hint_k * scale_k`` (only x; cache info passes through)."""
    hints, index = site.scratch.get("hints"), site.match.hint_index
    if hints is None or index is None:
        return None
    scale = site.inputs[family.scale_input]
    x = site.stream
    return x + hints[index][:, : x.size(1)] * scale[index]
