"""Hand-written VACE reference for the causal Wan stand-ins.

The surgery engine is validated bit for bit against this module. It follows the design of
scope's ``CausalVaceWanModel`` (spec ``vace.md`` 2.1-2.5): a *composition* wrapper that works
with every causal Wan model family through duck typing, with no per-pipeline code:

* the main blocks are replaced by ``BaseWanAttentionBlock`` instances (a dynamic subclass of the
  pipeline's own block class) that add ``scale * hint`` to their output;
* ``vace_blocks`` are ``VaceWanAttentionBlock`` instances (the same dynamic-subclass scheme) with
  ``before_proj`` on block 0 and ``after_proj`` on every block, both zero-initialised;
* ``vace_patch_embedding`` is ``Conv3d(vace_in_dim, dim)`` with kernel = stride = patch size.

Unlike scope, it does not copy the deviations listed in ``vace.md`` 2.8: it embeds timesteps
with the base model's own float64 ``sinusoidal_embedding_1d`` (A), honours the ``update_cache``
gate and the ``q_bank`` bank pre-pass (B), keeps run-time structure of the base blocks such as
fused ``to_qkv`` projections (C), keeps run-time attributes and ``requires_grad`` (D),
forwards attribute writes such as ``block_mask`` to the wrapped model (G), and keeps VACE
kwargs away from the training path (H). See ``docs/reference.md``.
"""
from __future__ import annotations

import copy
import inspect
import math
import sys
import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from surgery.errors import CallError, GraftError, OrderError, RuleError, WeightsError

__all__ = [
    "CausalVaceWanModel",
    "REFERENCE_KEY_MAP",
    "VACE_PREFIXES",
    "create_base_attention_block_class",
    "create_vace_attention_block_class",
    "load_vace_state_dict",
    "native_state_dict",
    "random_vace_state_dict",
    "to_native_key",
    "to_reference_key",
    "vace_key_shapes",
]

VACE_PREFIXES: tuple[str, ...] = ("vace_blocks.", "vace_patch_embedding.")

# Reference state_dict prefix -> native checkpoint prefix, first match wins. The wrapper holds
# the base model as ``causal_wan_model`` and, like scope, also registers the main blocks under
# the alias ``blocks``; both paths name the same tensors and map onto ``blocks.N.*``.
REFERENCE_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("causal_wan_model.", ""),
    ("blocks.", "blocks."),
    ("vace_blocks.", "vace_blocks."),
    ("vace_patch_embedding.", "vace_patch_embedding."),
)

# Keyword names the wrapper sets itself for every main block; caller values never override them.
_RESERVED_BLOCK_KWARGS = frozenset(
    {"x", "e", "seq_lens", "grid_sizes", "freqs", "context", "context_lens", "block_mask",
     "kv_cache", "crossattn_cache", "current_start", "hints"}
)
# Explicit parameters of ``CausalVaceWanModel._forward_inference``.
_WRAPPER_PARAMS = frozenset(
    {"self", "x", "t", "context", "seq_len", "clip_fea", "y", "vace_context", "vace_context_scale",
     "kv_cache", "crossattn_cache", "current_start"}
)
# Attributes of a block that must not travel to its replacement: a ``torch.compile``d call
# would bypass the hint injection of the new class, and ``block_id`` belongs to the new block.
_NOT_CARRIED = frozenset({"_compiled_call_impl", "block_id"})


# --------------------------------------------------------------------------------------------
# Helpers shared with the base model
# --------------------------------------------------------------------------------------------

def _sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Float64 timestep embedding (pipelines spec 1.1); used only if the base module lacks one."""
    assert dim % 2 == 0
    half = dim // 2
    position = position.type(torch.float64)
    sinusoid = torch.outer(
        position, torch.pow(10000, -torch.arange(half).to(position).div(half))
    )
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def _base_helper(model: nn.Module, name: str, fallback: Any) -> Any:
    """The helper ``name`` from the module that defines the base model's class.

    Reusing the base model's own helper keeps its exact numerics (float64 embedding; Krea's
    variant builds the ``arange`` on the position's device), which scope's float32 copy breaks.
    """
    for cls in type(model).__mro__:
        module = sys.modules.get(cls.__module__)
        helper = getattr(module, name, None) if module is not None else None
        if callable(helper):
            return helper
    return fallback


def _parameters_of(fn: Any) -> tuple[frozenset[str], bool]:
    """Named parameters of ``fn`` and whether it takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    names = frozenset(
        p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _defaults_of(fn: Any) -> dict[str, Any]:
    """Keyword defaults of ``fn``."""
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.default is not inspect.Parameter.empty
    }


def _model_value(model: nn.Module, name: str) -> tuple[bool, Any]:
    """``(found, value)`` for a constructor argument, read from the model or its config."""
    if name in model.__dict__ or hasattr(type(model), name):
        return True, getattr(model, name)
    config = getattr(model, "config", None)
    if isinstance(config, Mapping) and name in config:
        return True, config[name]
    if config is not None and not isinstance(config, Mapping) and hasattr(config, name):
        return True, getattr(config, name)
    return False, None


# --------------------------------------------------------------------------------------------
# Generated block classes (cached per base block class so isinstance checks are stable)
# --------------------------------------------------------------------------------------------

_BASE_CLASSES: dict[type, type] = {}
_VACE_CLASSES: dict[type, type] = {}


def create_base_attention_block_class(orig: type[nn.Module]) -> type[nn.Module]:
    """Subclass ``BaseWanAttentionBlock`` of ``orig`` that adds ``scale * hint`` after the block."""
    if orig in _BASE_CLASSES:
        return _BASE_CLASSES[orig]

    class BaseWanAttentionBlock(orig):  # type: ignore[misc, valid-type]
        """A main block that adds its VACE hint to the block output (vace.md 1.2, 2.3)."""

        def __init__(self, *args: Any, block_id: int | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.block_id = block_id

        def forward(self, x: torch.Tensor, *args: Any,
                    hints: Sequence[tuple[Sequence[torch.Tensor], float | Sequence[float]]] | None = None,
                    **kwargs: Any) -> Any:
            """The block, then ``x + hint * scale`` for each ``(hints, scale)`` pair of ``hints``
            (one pair per VACE context, added in order as ComfyUI does)."""
            result = super().forward(x, *args, **kwargs)
            if not hints or self.block_id is None:
                return result
            # Tuple-returning blocks carry deferred cache-update info: only x changes.
            out, info = result if isinstance(result, tuple) else (result, None)
            for context_hints, context_scale in hints:
                hint = context_hints[self.block_id]
                if hint.shape[1] > out.shape[1]:
                    hint = hint[:, : out.shape[1]]
                scale = (context_scale[self.block_id]
                         if isinstance(context_scale, (list, tuple)) else context_scale)
                out = out + hint * scale
            return (out, info) if isinstance(result, tuple) else out

    BaseWanAttentionBlock.__qualname__ = "BaseWanAttentionBlock"
    BaseWanAttentionBlock.__module__ = __name__
    _BASE_CLASSES[orig] = BaseWanAttentionBlock
    return BaseWanAttentionBlock


def create_vace_attention_block_class(orig: type[nn.Module]) -> type[nn.Module]:
    """Subclass ``VaceWanAttentionBlock`` of ``orig`` with ``before_proj``/``after_proj``."""
    if orig in _VACE_CLASSES:
        return _VACE_CLASSES[orig]

    class VaceWanAttentionBlock(orig):  # type: ignore[misc, valid-type]
        """A VACE context block: the base block plus zero-initialised projections (vace.md 2.2)."""

        def __init__(self, *args: Any, block_id: int = 0, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.block_id = block_id
            dim = self.dim
            if block_id == 0:
                self.before_proj = nn.Linear(dim, dim)
                nn.init.zeros_(self.before_proj.weight)
                nn.init.zeros_(self.before_proj.bias)
            self.after_proj = nn.Linear(dim, dim)
            nn.init.zeros_(self.after_proj.weight)
            nn.init.zeros_(self.after_proj.bias)

        def forward_vace(self, c: torch.Tensor, x0: torch.Tensor, e: torch.Tensor,
                         seq_lens: torch.Tensor, grid_sizes: torch.Tensor, freqs: torch.Tensor,
                         context: torch.Tensor, context_lens: Any, block_mask: Any,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
            """One VACE step: returns ``(hint, c')`` with ``hint = after_proj(c')``.

            The block runs cache-free (``kv_cache=None``, ``crossattn_cache=None``,
            ``current_start=0``): the branch is recomputed for every call.
            """
            if self.block_id == 0:
                c = self.before_proj(c[:, : x0.size(1)]) + x0
            c = super().forward(c, e, seq_lens, grid_sizes, freqs, context, context_lens,
                                block_mask, kv_cache=None, crossattn_cache=None, current_start=0)
            if isinstance(c, tuple):
                c = c[0]
            return self.after_proj(c), c

    VaceWanAttentionBlock.__qualname__ = "VaceWanAttentionBlock"
    VaceWanAttentionBlock.__module__ = __name__
    _VACE_CLASSES[orig] = VaceWanAttentionBlock
    return VaceWanAttentionBlock


def _adopt(new: nn.Module, old: nn.Module) -> None:
    """Make ``new`` use ``old``'s children, parameters, buffers and plain attributes.

    Parameters are reused by assignment (same ``Parameter`` objects: no copies, same
    ``requires_grad``). Submodules and attributes added at run time, such as Krea's fused
    ``self_attn.to_qkv`` and ``fused_projections``, survive because whole children are reused.
    """
    for key, value in old.__dict__.items():
        if key in _NOT_CARRIED:
            continue
        # Containers are per-module state: give the new block its own copy.
        new.__dict__[key] = copy.copy(value) if isinstance(value, (dict, set)) else value


# --------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------

class CausalVaceWanModel(nn.Module):
    """VACE composition wrapper around any causal Wan model (vace.md 2.1-2.5, without 2.8 A-D, G).

    Args:
        causal_wan_model: the base model; its ``blocks`` are replaced in place (parameters shared).
        vace_in_dim: input channels of the VACE context (96 for every official checkpoint).
        vace_layers: main-block indices that receive a hint; default every second layer. Must
            contain 0. VACE block ``K`` feeds main block ``vace_layers[K]``.
    """

    def __init__(self, causal_wan_model: nn.Module, vace_in_dim: int = 96,
                 vace_layers: Sequence[int] | None = None) -> None:
        super().__init__()
        self.causal_wan_model = causal_wan_model
        model = causal_wan_model
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise GraftError(f"{type(model).__name__} has no non-empty ModuleList 'blocks'",
                             "wrap a causal Wan model (one with .blocks)")
        num_layers = len(blocks)
        layers = list(range(0, num_layers, 2)) if vace_layers is None else [int(i) for i in vace_layers]
        if 0 not in layers or len(set(layers)) != len(layers) or not all(0 <= i < num_layers for i in layers):
            raise RuleError(
                f"vace_layers={layers} is invalid for a {num_layers}-layer model",
                f"pass distinct indices in [0, {num_layers}) that include 0",
            )
        self.vace_in_dim = vace_in_dim
        self.vace_layers = layers
        self.vace_layers_mapping = {layer: k for k, layer in enumerate(layers)}

        orig_cls = type(blocks[0])
        if any(type(b) is not orig_cls for b in blocks):
            raise OrderError(
                "the main blocks are not all of one class (already wrapped by VACE or LoRA?)",
                "wrap the plain base model: Base -> VACE -> LoRA",
            )
        self._original_block_class = orig_cls
        names, var_kw = _parameters_of(orig_cls.forward)
        # None: the block takes **kwargs, so every call kwarg may reach it.
        self._block_forward_params: frozenset[str] | None = None if var_kw else names
        fi = getattr(type(model), "_forward_inference", None)
        if fi is None:
            raise GraftError(f"{type(model).__name__} has no _forward_inference",
                             "wrap a causal Wan model with a cache inference path")
        fi_names, fi_var_kw = _parameters_of(fi)
        self._base_inference_params = None if fi_var_kw else fi_names
        self._base_inference_defaults = {
            k: v for k, v in _defaults_of(fi).items() if k not in _WRAPPER_PARAMS
        }

        self._replace_blocks(orig_cls)
        self._create_vace_modules(orig_cls, vace_in_dim)

    # ---- construction ------------------------------------------------------------------------

    def _block_init_kwargs(self, orig_cls: type[nn.Module], cross_attn_type: str) -> dict[str, Any]:
        """Constructor kwargs for ``orig_cls`` read from the base model by duck typing."""
        model = self.causal_wan_model
        names, _ = _parameters_of(orig_cls.__init__)
        kwargs: dict[str, Any] = {}
        signature = inspect.signature(orig_cls.__init__).parameters
        for name in names - {"self", "block_id"}:
            if name == "cross_attn_type":
                kwargs[name] = cross_attn_type
                continue
            found, value = _model_value(model, name)
            if found:
                kwargs[name] = value
            elif signature[name].default is inspect.Parameter.empty:
                raise GraftError(
                    f"cannot build {orig_cls.__name__}: the base model has no '{name}'",
                    f"set {name!r} on the model or its config",
                )
        return kwargs

    def _replace_blocks(self, orig_cls: type[nn.Module]) -> None:
        """Swap every main block for a ``BaseWanAttentionBlock`` that reuses its parameters."""
        model = self.causal_wan_model
        base_cls = create_base_attention_block_class(orig_cls)
        main_type = "t2v_cross_attn" if getattr(model, "model_type", "t2v") == "t2v" else "i2v_cross_attn"
        init_kwargs = self._block_init_kwargs(orig_cls, main_type)
        new_blocks = []
        for i, old in enumerate(model.blocks):
            # Built on meta only to check that the duck-typed kwargs give the old structure.
            with torch.device("meta"):
                new = base_cls(**init_kwargs, block_id=self.vace_layers_mapping.get(i))
            self._check_structure(new, old, i)
            _adopt(new, old)
            new.block_id = self.vace_layers_mapping.get(i)
            new_blocks.append(new)
        blocks = nn.ModuleList(new_blocks)
        model.blocks = blocks
        # The alias scope keeps "for LoRA compatibility"; native keys come from REFERENCE_KEY_MAP.
        self.blocks = blocks

    @staticmethod
    def _check_structure(new: nn.Module, old: nn.Module, index: int) -> None:
        old_sd = old.state_dict()
        if any("lora_" in k or ".base_layer." in k for k in old_sd):
            raise OrderError(f"main block {index} already carries LoRA layers",
                             "graft VACE before applying LoRA: Base -> VACE -> LoRA")
        for key, value in new.state_dict().items():
            if key not in old_sd or tuple(old_sd[key].shape) != tuple(value.shape):
                raise GraftError(
                    f"block {index} rebuilt from the model's attributes differs at '{key}'",
                    "make the model's dim/ffn_dim/num_heads/qk_norm/cross_attn_norm/eps attributes "
                    "match its blocks",
                )

    def _create_vace_modules(self, orig_cls: type[nn.Module], vace_in_dim: int) -> None:
        model = self.causal_wan_model
        anchor = model.patch_embedding.weight  # the base model's device, dtype and requires_grad
        vace_cls = create_vace_attention_block_class(orig_cls)
        # VACE blocks always use text-to-video cross-attention (vace.md 1.1).
        init_kwargs = self._block_init_kwargs(orig_cls, "t2v_cross_attn")
        patch_size = tuple(model.patch_size)
        # Built where the base model lives (meta stays meta), so real sizes need no CPU copy.
        with torch.device(anchor.device):
            self.vace_blocks = nn.ModuleList(
                vace_cls(**init_kwargs, block_id=k) for k in range(len(self.vace_layers))
            )
            self.vace_patch_embedding = nn.Conv3d(
                vace_in_dim, model.dim, kernel_size=patch_size, stride=patch_size
            )
        for module in (self.vace_blocks, self.vace_patch_embedding):
            module.to(device=anchor.device, dtype=anchor.dtype)
            module.requires_grad_(anchor.requires_grad)
            module.train(model.training)
        self.train(model.training)

    # ---- transparent attribute access --------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "causal_wan_model" or "causal_wan_model" not in modules:
                raise
            return getattr(modules["causal_wan_model"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Pipelines write run-time state (block_mask, local_attn_size, ...) onto whatever object
        # they hold; plain attributes of the base model go to the base model, which reads them.
        inner = self.__dict__.get("_modules", {}).get("causal_wan_model")
        if (
            inner is not None
            and name not in self.__dict__
            and name in inner.__dict__
            and not isinstance(value, (nn.Module, nn.Parameter))
        ):
            setattr(inner, name, value)
            return
        super().__setattr__(name, value)

    # ---- calls -------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Cache inference goes through the VACE path; anything else to the base model unchanged."""
        if kwargs.get("kv_cache") is not None:
            return self._forward_inference(*args, **kwargs)
        vace_context = kwargs.pop("vace_context", None)
        kwargs.pop("vace_context_scale", None)
        if vace_context is not None:
            raise CallError("vace_context was given without kv_cache",
                            "VACE runs on the cache inference path: pass kv_cache")
        return self.causal_wan_model(*args, **kwargs)

    def _call_kwargs(self, block_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Caller kwargs the base ``_forward_inference`` accepts, completed with its defaults."""
        accepted = self._base_inference_params
        given = {k: v for k, v in block_kwargs.items() if accepted is None or k in accepted}
        return {**self._base_inference_defaults, **given}

    def _block_kwargs(self, call_kwargs: dict[str, Any], index: int) -> dict[str, Any]:
        """Per-block kwargs: names the block accepts; per-layer lists are indexed ``[index]``."""
        params = self._block_forward_params
        num_layers = len(self.blocks)
        out = {}
        for name, value in call_kwargs.items():
            if name in _RESERVED_BLOCK_KWARGS or (params is not None and name not in params):
                continue
            if isinstance(value, (list, tuple)) and len(value) == num_layers:
                value = value[index]
            out[name] = value
        return out

    def _contexts(self, vace_context: Any, vace_context_scale: Any) -> list[tuple[Any, Any]]:
        """``(context, scale)`` pairs: one for a single context, one per context for a list of them.

        A list is several contexts when its first item is a ``[B, C, F, H, W]`` tensor or a
        list of ``[C, F, H, W]`` tensors; then the scale is a number for every context or a
        list with one entry (a number or per-layer values) per context.
        """
        if vace_context is None:
            return []
        first = vace_context[0] if isinstance(vace_context, (list, tuple)) and vace_context else None
        if not (isinstance(first, (list, tuple)) or isinstance(first, torch.Tensor) and first.dim() == 5):
            return [(vace_context, self._layer_scales(vace_context_scale))]
        if isinstance(vace_context_scale, (list, tuple)):
            if len(vace_context_scale) != len(vace_context):
                raise CallError(
                    f"vace_context_scale has {len(vace_context_scale)} entries for {len(vace_context)} contexts",
                    "pass a float or one entry per context",
                )
            scales = list(vace_context_scale)
        else:
            scales = [vace_context_scale] * len(vace_context)
        return [(context, self._layer_scales(scale)) for context, scale in zip(vace_context, scales)]

    def _layer_scales(self, scale: Any) -> float | tuple[float, ...]:
        """A float, or one float per VACE layer (diffusers semantics); None means 1.0."""
        if scale is None:
            return 1.0
        if isinstance(scale, torch.Tensor):
            scale = scale.tolist()
        if isinstance(scale, (int, float)):
            return float(scale)
        if isinstance(scale, Sequence) and len(scale) == len(self.vace_layers):
            return tuple(float(s) for s in scale)
        raise CallError(
            f"vace_context_scale {scale!r} is neither a number nor one value per VACE layer",
            f"pass a float or a sequence of {len(self.vace_layers)} floats",
        )

    def _embed(self, x: torch.Tensor, t: torch.Tensor, context: Any, seq_len: int,
               clip_fea: Any, y: Any) -> tuple[torch.Tensor, ...]:
        """The base model's prologue (pipelines spec 1.9 steps 2-5), with the base helpers."""
        model = self.causal_wan_model
        if getattr(model, "model_type", "t2v") == "i2v":
            assert clip_fea is not None and y is not None
        device = model.patch_embedding.weight.device
        if model.freqs.device != device:
            model.freqs = model.freqs.to(device)
        if y is not None:
            x = [torch.cat([u, v], dim=0) for u, v in zip(x, y)]
        x = [model.patch_embedding(u.unsqueeze(0)) for u in x]
        grid_sizes = torch.stack([torch.tensor(u.shape[2:], dtype=torch.long) for u in x])
        x = [u.flatten(2).transpose(1, 2) for u in x]
        seq_lens = torch.tensor([u.size(1) for u in x], dtype=torch.long)
        assert seq_lens.max() <= seq_len
        x = torch.cat(x)
        sinusoidal = _base_helper(model, "sinusoidal_embedding_1d", _sinusoidal_embedding_1d)
        e = model.time_embedding(sinusoidal(model.freq_dim, t.flatten()).type_as(x))
        e0 = model.time_projection(e).unflatten(1, (6, model.dim)).unflatten(0, t.shape)
        context_lens = None
        context = model.text_embedding(
            torch.stack([torch.cat([u, u.new_zeros(model.text_len - u.size(0), u.size(1))])
                         for u in context])
        )
        if clip_fea is not None:
            context = torch.concat([model.img_emb(clip_fea), context], dim=1)
        return x, e, e0, grid_sizes, seq_lens, context, context_lens

    def forward_vace(self, x0: torch.Tensor, vace_context: Any, seq_len: int, e0: torch.Tensor,
                     seq_lens: torch.Tensor, grid_sizes: torch.Tensor, freqs: torch.Tensor,
                     context: torch.Tensor, context_lens: Any, block_mask: Any,
                     ) -> list[torch.Tensor]:
        """Run the whole VACE branch (cache-free) and return one hint per VACE layer."""
        if isinstance(vace_context, torch.Tensor):
            if vace_context.dim() != 5:
                raise CallError(f"vace_context has shape {tuple(vace_context.shape)}",
                                "pass [B, C, F, H, W] or a list of [C, F, H, W] tensors")
            vace_context = list(vace_context)
        if len(vace_context) != x0.size(0) or any(u.dim() != 4 for u in vace_context):
            raise CallError(
                f"vace_context must hold {x0.size(0)} tensors of shape [C, F, H, W]",
                "pass one [C, F, H, W] context per batch element",
            )
        weight = self.vace_patch_embedding.weight
        c = [self.vace_patch_embedding(u.to(device=weight.device, dtype=weight.dtype).unsqueeze(0))
             for u in vace_context]
        for b, u in enumerate(c):
            if list(u.shape[3:]) != grid_sizes[b].tolist()[1:]:
                raise CallError(
                    f"vace_context token grid {list(u.shape[2:])} does not match the latent grid "
                    f"{grid_sizes[b].tolist()}",
                    "encode the VACE context at the latent's height and width",
                )
        c = [u.flatten(2).transpose(1, 2) for u in c]
        c = torch.cat(
            [torch.cat([u, u.new_zeros(1, max(0, seq_len - u.size(1)), u.size(2))], dim=1) for u in c]
        )
        hints = []
        for block in self.vace_blocks:
            hint, c = block.forward_vace(c, x0, e0, seq_lens, grid_sizes, freqs, context,
                                         context_lens, block_mask)
            hints.append(hint)
        return hints

    def _forward_inference(self, x: torch.Tensor, t: torch.Tensor, context: Any, seq_len: int,
                           clip_fea: Any = None, y: Any = None, vace_context: Any = None,
                           vace_context_scale: Any = 1.0, kv_cache: list[dict] | None = None,
                           crossattn_cache: list[dict] | None = None, current_start: int = 0,
                           **block_kwargs: Any) -> torch.Tensor:
        """The base model's cache inference plus VACE hints (vace.md 2.5 without 2.8 A/B).

        ``block_kwargs`` reach the blocks when both the base ``_forward_inference`` and the
        block's forward accept them (lists of length ``num_layers`` are indexed per block),
        missing ones take the base ``_forward_inference`` defaults, and they reach the
        base model's cache hooks (``_apply_cache_updates_before``, ``_apply_cache_updates``).
        """
        model = self.causal_wan_model
        call_kwargs = self._call_kwargs(block_kwargs)
        x, e, e0, grid_sizes, seq_lens, context, context_lens = self._embed(
            x, t, context, seq_len, clip_fea, y
        )
        block_mask = model.block_mask

        # Bank pre-pass (MemFlow's q_bank step), before any block runs, as in the base model.
        pre_pass = getattr(model, "_apply_cache_updates_before", None)
        kv_bank = call_kwargs.get("kv_bank")
        if pre_pass is not None and kv_bank is not None and call_kwargs.get("q_bank"):
            frame_seqlen = math.prod(grid_sizes[0][1:]).item()
            pre_pass(kv_bank, crossattn_cache, frame_seqlen)

        # Each context runs through the whole VACE branch on its own (same weights).
        hints = [(self.forward_vace(x, vace, seq_len, e0, seq_lens, grid_sizes, model.freqs, context,
                                    context_lens, block_mask), scale)
                 for vace, scale in self._contexts(vace_context, vace_context_scale)]

        shared = dict(e=e0, seq_lens=seq_lens, grid_sizes=grid_sizes, freqs=model.freqs,
                      context=context, context_lens=context_lens, block_mask=block_mask)
        checkpointing = torch.is_grad_enabled() and getattr(model, "gradient_checkpointing", False)
        infos = []
        for i, block in enumerate(self.blocks):
            kwargs = dict(
                shared,
                kv_cache=None if kv_cache is None else kv_cache[i],
                current_start=current_start,
                **self._block_kwargs(call_kwargs, i),
            )
            if checkpointing:
                # As in the base models and scope: no crossattn_cache on the checkpointed branch.
                result = torch.utils.checkpoint.checkpoint(block, x, hints=hints, use_reentrant=False, **kwargs)
            else:
                kwargs["crossattn_cache"] = None if crossattn_cache is None else crossattn_cache[i]
                result = block(x, hints=hints, **kwargs)
            if kv_cache is not None and isinstance(result, tuple):
                x, info = result
                infos.append((i, info))
            else:
                x = result

        if kv_cache is not None and infos:
            self._commit_cache_updates(kv_cache, infos, call_kwargs)

        x = model.head(x, e.unflatten(0, t.shape).unsqueeze(2))
        x = model.unpatchify(x, grid_sizes)
        return torch.stack(x)

    def _commit_cache_updates(self, kv_cache: list[dict], infos: list, call_kwargs: dict) -> None:
        """The base model's deferred cache update, gated by ``update_cache`` when it has one."""
        model = self.causal_wan_model
        apply = getattr(model, "_apply_cache_updates", None)
        if apply is None:
            raise GraftError(
                f"blocks returned cache-update info but {type(model).__name__} has no "
                "_apply_cache_updates",
                "give the base model its deferred cache-update method",
            )
        accepted = self._base_inference_params
        if (accepted is None or "update_cache" in accepted) and not call_kwargs.get("update_cache", True):
            return
        names, _ = _parameters_of(apply)
        extra = {k: v for k, v in call_kwargs.items()
                 if k in names and k not in {"kv_cache", "cache_update_infos"}}
        apply(kv_cache, infos, **extra)


# --------------------------------------------------------------------------------------------
# Keys and weights
# --------------------------------------------------------------------------------------------

def to_native_key(key: str) -> str:
    """The native checkpoint name of a reference state_dict key (``REFERENCE_KEY_MAP``)."""
    for ref_prefix, native_prefix in REFERENCE_KEY_MAP:
        if key.startswith(ref_prefix):
            return native_prefix + key[len(ref_prefix):]
    raise WeightsError(f"reference key '{key}' has no native name",
                       "extend REFERENCE_KEY_MAP for the new submodule")


def to_reference_key(native_key: str) -> str:
    """The canonical reference key of a native key (VACE keys unchanged, base keys prefixed)."""
    if native_key.startswith(VACE_PREFIXES):
        return native_key
    return "causal_wan_model." + native_key


def native_state_dict(reference: CausalVaceWanModel) -> dict[str, torch.Tensor]:
    """``reference.state_dict()`` renamed to native keys; tensors share storage (no copies)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in reference.state_dict().items():
        native = to_native_key(key)
        if native in out:
            # The ``blocks.`` alias names the same parameter as ``causal_wan_model.blocks.``.
            if out[native].data_ptr() != value.data_ptr():
                raise WeightsError(f"'{key}' and another key both map to '{native}'",
                                   "fix REFERENCE_KEY_MAP so native names are unique")
            continue
        out[native] = value
    return out


def load_vace_state_dict(reference: CausalVaceWanModel,
                         state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load native VACE weights like scope's ``load_vace_weights_only`` (vace.md 3).

    A VACE-only file is used as is; a full checkpoint is filtered to the VACE prefixes. The
    weights are copied into the existing parameters (keeping their device and dtype) with
    ``strict=False``. Raises :class:`WeightsError` when nothing VACE is present, when the
    patch embedding has the wrong shape, when a VACE key of the model is missing, or when the
    loaded patch embedding is all zeros. Returns the unexpected keys (warned about, not loaded).
    """
    sd = dict(state_dict)
    if not all(k.startswith(VACE_PREFIXES) for k in sd):
        sd = {k: v for k, v in sd.items() if k.startswith(VACE_PREFIXES)}
        if not sd:
            raise WeightsError("the checkpoint has no vace_blocks.* or vace_patch_embedding.* keys",
                               "load a VACE checkpoint or a VACE-only module")
    name = "vace_patch_embedding.weight"
    expected = tuple(reference.vace_patch_embedding.weight.shape)
    if name in sd and tuple(sd[name].shape) != expected:
        raise WeightsError(
            f"{name} has shape {tuple(sd[name].shape)}, the model expects {expected}",
            f"build the wrapper with vace_in_dim={sd[name].shape[1]} and the checkpoint's dim",
        )
    result = reference.load_state_dict(sd, strict=False, assign=False)
    missing = [k for k in result.missing_keys if k.startswith(VACE_PREFIXES)]
    if missing:
        raise WeightsError(
            f"the checkpoint lacks {len(missing)} VACE keys of the model, e.g. '{missing[0]}'",
            "match vace_layers to the checkpoint's number of vace_blocks",
        )
    if result.unexpected_keys:
        warnings.warn(f"ignored {len(result.unexpected_keys)} unexpected VACE keys, "
                      f"e.g. '{result.unexpected_keys[0]}'", stacklevel=2)
    if not torch.any(reference.vace_patch_embedding.weight):
        raise WeightsError("vace_patch_embedding.weight is all zeros after loading",
                           "load a trained VACE checkpoint")
    return list(result.unexpected_keys)


def vace_key_shapes(dim: int, ffn_dim: int, num_vace_blocks: int, vace_in_dim: int = 96,
                    patch_size: Sequence[int] = (1, 2, 2), qk_norm: bool = True,
                    cross_attn_norm: bool = True) -> dict[str, tuple[int, ...]]:
    """Native VACE key names and shapes (vace.md 5.3) for the given dimensions."""
    shapes: dict[str, tuple[int, ...]] = {
        "vace_patch_embedding.weight": (dim, vace_in_dim, *patch_size),
        "vace_patch_embedding.bias": (dim,),
    }
    for k in range(num_vace_blocks):
        p = f"vace_blocks.{k}."
        shapes[p + "modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{p}{attn}.{proj}.weight"] = (dim, dim)
                shapes[f"{p}{attn}.{proj}.bias"] = (dim,)
            if qk_norm:
                shapes[f"{p}{attn}.norm_q.weight"] = (dim,)
                shapes[f"{p}{attn}.norm_k.weight"] = (dim,)
        if cross_attn_norm:
            shapes[p + "norm3.weight"] = (dim,)
            shapes[p + "norm3.bias"] = (dim,)
        shapes[p + "ffn.0.weight"] = (ffn_dim, dim)
        shapes[p + "ffn.0.bias"] = (ffn_dim,)
        shapes[p + "ffn.2.weight"] = (dim, ffn_dim)
        shapes[p + "ffn.2.bias"] = (dim,)
        if k == 0:
            shapes[p + "before_proj.weight"] = (dim, dim)
            shapes[p + "before_proj.bias"] = (dim,)
        shapes[p + "after_proj.weight"] = (dim, dim)
        shapes[p + "after_proj.bias"] = (dim,)
    return shapes


def _vace_shapes_of(source: nn.Module | Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    if isinstance(source, CausalVaceWanModel):
        sd: Mapping[str, Any] = native_state_dict(source)
    elif isinstance(source, nn.Module):
        sd = source.state_dict()
    else:
        sd = source
    shapes = {
        k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
        for k, v in sd.items() if k.startswith(VACE_PREFIXES)
    }
    if not shapes:
        raise WeightsError("the source has no vace_blocks.* or vace_patch_embedding.* keys",
                           "pass a VACE-wrapped model, a native VACE state_dict or key shapes")
    return shapes


def random_vace_state_dict(source: nn.Module | Mapping[str, Any] | None = None, *, seed: int = 0,
                           dtype: torch.dtype = torch.float32,
                           **dims: Any) -> dict[str, torch.Tensor]:
    """Seeded random, non-zero native VACE weights (including ``before_proj``/``after_proj``).

    ``source`` is a VACE model (the reference or a rewritten model with native keys), a
    mapping of native VACE keys to tensors or shapes, or None with ``dims`` for
    :func:`vace_key_shapes`. Each tensor depends only on ``(seed, key, shape)``, so every
    model with the same VACE keys receives identical values. Scales keep activations of order
    one: weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2),
    modulation ~ N(0, 1/dim) as in the base models.
    """
    shapes = vace_key_shapes(**dims) if source is None else _vace_shapes_of(source)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        if key.endswith("modulation"):
            value = noise / math.sqrt(shape[-1])
        elif len(shape) >= 2:
            value = noise / math.sqrt(math.prod(shape[1:]))
        elif ".norm" in key and key.endswith(".weight"):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.1 * noise
        out[key] = value.to(dtype)
    return out
