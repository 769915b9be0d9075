"""Model families for the VACE rule, as data.

The VACE computation is the same in every implementation (vace.md 1.2: ``c_0 =
input_projection(E_v(context)) + x0``, one hint per VACE block through its output
projection, ``x + hint * scale`` after main block ``vace_layers[k]``). What differs between
model families is naming and plumbing, and a :class:`VaceProfile` states those facts for
one family, so that :mod:`rules.vace.rule` names none:

* how a model of the family is recognised (:class:`Detect`);
* which call arguments make the innermost module taking them run as one opaque call while
  tracing (the Wan family's caches; diffusers' attention, which takes ``attention_mask``);
* where the model declares its block count (optional: without it, the match count is used);
* where a block's constructor settings are read back (see
  :mod:`surgery.grafting.settings`), and settings VACE blocks always use;
* the names of the grafted modules and of the block-0 input and per-block output projections;
* the rule's call inputs (the control context and its per-layer scale);
* key maps to the other layout's checkpoints (:mod:`rules.vace.keymaps`).

The injection arithmetic needs no entry: every family computes ``x + hint * scale`` after the
block, hint ``k`` with scale ``k`` (diffusers: ``hidden_states + control_hint * scale``; with
several contexts one such term per context, in order, as ComfyUI does), and zero-pads the
embedded context to the latent's tokens. Only the embedding's batching differs
(``batched_embedding``).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch.nn as nn

from surgery.errors import RuleError

from .keymaps import DIFFUSERS_TO_NATIVE, NATIVE_TO_DIFFUSERS


@dataclass(frozen=True)
class Detect:
    """How a profile recognises a model.

    Args:
        entry_parameters: some method of the model's class (``forward``, or the method a
            ``forward(*args, **kwargs)`` passes its call on to) takes all of these.
    """

    entry_parameters: frozenset[str]

    def matches(self, model: nn.Module) -> bool:
        return any(self.entry_parameters <= names for names in _method_parameters(type(model)))


@dataclass(frozen=True)
class VaceProfile:
    """The facts about one model family that the VACE rule needs.

    Args:
        name: short name (``vace.rule(profile=name)``, reports).
        description: which models and layout it stands for.
        detect: how ``vace.rule()`` recognises the family (``None``: never detected, pass it).
        leaf_arguments: argument names whose innermost taker runs as one opaque call while
            tracing (``TracePolicy.cache_arguments``).
        block_count: attribute paths (``"num_layers"``, ``"config.num_layers"``) where the
            model may declare its block count; the first present wins, none: the match count.
        block_settings: where a block's constructor settings are read back, in order (a
            subset of :data:`surgery.grafting.settings.SOURCES`).
        block_overrides: constructor settings every VACE block uses, whatever the block has.
        context_input, scale_input: the rule's call inputs.
        batched_embedding: embed the control context with one convolution over the batch
            (diffusers) rather than one per batch element (the Wan family's list of
            ``[C, F, H, W]`` contexts); the two round differently, so each family's own.
        patch_embedding, blocks: names of the grafted embedding and block list.
        input_projection, output_projection: names of VACE block 0's input projection and
            every VACE block's output projection.
        key_maps: key maps from other layouts' checkpoints to this one, by layout name.
    """

    name: str
    description: str
    detect: Detect | None
    leaf_arguments: frozenset[str]
    context_input: str
    scale_input: str
    input_projection: str
    output_projection: str
    block_count: tuple[str, ...] = ()
    block_settings: tuple[str, ...] = ("attributes", "config")
    block_overrides: Mapping[str, Any] = field(default_factory=dict)
    batched_embedding: bool = False
    patch_embedding: str = "vace_patch_embedding"
    blocks: str = "vace_blocks"
    key_maps: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)

    def declared_count(self, model: nn.Module) -> int | None:
        """The block count the model declares (``block_count``), or None.

        Raises:
            RuleError: a declared value that is not a positive integer.
        """
        for path in self.block_count:
            value = _lookup(model, path)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise RuleError(f"the model's {path} is {value!r}, not a block count",
                                "pass num_layers=... to the VACE rule")
            return value
        return None


WAN = VaceProfile(
    name="wan",
    description="the original Wan/VACE layout (Wan2.1, ali-vilab/VACE, scope) and the streaming Wan models "
                "(LongLive, StreamDiffusionV2, Krea Realtime Video, RewardForcing, MemFlow): CausalWanModel",
    detect=Detect(entry_parameters=frozenset({"t", "context", "seq_len"})),
    leaf_arguments=frozenset({"kv_cache", "crossattn_cache", "kv_bank"}),
    context_input="vace_context",
    scale_input="vace_context_scale",
    input_projection="before_proj",
    output_projection="after_proj",
    block_count=("num_layers",),
    # Every Wan-family block keeps its constructor arguments as attributes (scope copies
    # them by duck typing, vace.md 2.1); Wan2.1's WanModel also has a diffusers config.
    block_settings=("attributes", "config"),
    # VACE blocks always use text-to-video cross-attention (vace.md 1.1).
    block_overrides={"cross_attn_type": "t2v_cross_attn"},
    key_maps={"diffusers": DIFFUSERS_TO_NATIVE},
)

DIFFUSERS = VaceProfile(
    name="diffusers",
    description="diffusers' WanTransformer3DModel, rewritten into a drop-in for WanVACETransformer3DModel "
                "(same call, same state_dict keys)",
    detect=Detect(entry_parameters=frozenset({"hidden_states", "timestep", "encoder_hidden_states"})),
    # diffusers has no caches; its attention modules (WanAttention) take attention_mask, and
    # must be opaque: their processor writes RoPE in place and dispatches to a kernel.
    leaf_arguments=frozenset({"attention_mask"}),
    context_input="control_hidden_states",
    scale_input="control_hidden_states_scale",
    input_projection="proj_in",
    output_projection="proj_out",
    block_count=("config.num_layers",),
    # WanTransformerBlock keeps no constructor argument as an attribute; the model's config
    # holds ffn_dim, qk_norm, cross_attn_norm, eps, added_kv_proj_dim, the structure the rest
    # (dim, num_heads).
    block_settings=("attributes", "config", "structure"),
    # WanVACETransformer3DModel runs vace_patch_embedding on the [B, 96, F, H, W] batch.
    batched_embedding=True,
    key_maps={"native": NATIVE_TO_DIFFUSERS},
)

#: Built-in profiles by name, in detection order.
PROFILES: Mapping[str, VaceProfile] = {profile.name: profile for profile in (DIFFUSERS, WAN)}
#: The profile of a model no profile recognises: the original VACE layout.
FALLBACK = WAN


def resolve(profile: str | VaceProfile) -> VaceProfile:
    """A profile given by name or as itself.

    Raises:
        RuleError: an unknown name or something else.
    """
    if isinstance(profile, VaceProfile):
        return profile
    if isinstance(profile, str) and profile in PROFILES:
        return PROFILES[profile]
    known = ", ".join(repr(name) for name in PROFILES)
    raise RuleError(f"unknown VACE profile {profile!r}",
                    f"use one of {known}, or pass a rules.vace.VaceProfile for another family")


def detect(model: nn.Module) -> VaceProfile:
    """The first built-in profile that recognises ``model``, else :data:`FALLBACK`."""
    for profile in PROFILES.values():
        if profile.detect is not None and profile.detect.matches(model):
            return profile
    return FALLBACK


@lru_cache(maxsize=None)
def _method_parameters(cls: type) -> tuple[frozenset[str], ...]:
    """Parameter names of each function defined by ``cls`` or a base outside torch."""
    found = []
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("torch."):
            continue
        for value in vars(klass).values():
            if inspect.isfunction(value):
                try:
                    found.append(frozenset(inspect.signature(value).parameters))
                except (TypeError, ValueError):  # builtins and odd wrappers have no signature
                    continue
    return tuple(found)


def _lookup(model: nn.Module, path: str) -> Any:
    value: Any = model
    for part in path.split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        else:
            value = getattr(value, part, None)
        if value is None:
            return None
    return value


__all__ = ["DIFFUSERS", "Detect", "FALLBACK", "PROFILES", "VaceProfile", "WAN", "detect", "resolve"]
