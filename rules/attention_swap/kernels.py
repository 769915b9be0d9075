"""Attention kernels and the layout adapter that puts one in place of a model's attention function.

A kernel is called the way ``torch.nn.functional.scaled_dot_product_attention`` is:
``kernel(q, k, v, *, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None)`` on
``[batch, heads, tokens, head_dim]`` tensors, returning the same layout. Model code calls
its attention functions in its own layout: flash-attention style ``attention``/``flash_attention`` take
``[B, L, heads, d]`` (``"BLHD"``), ``flex_attention`` and SDPA ``[B, heads, L, d]``
(``"BHLD"``). :class:`KernelCall` is what the model's function name is bound to after the
swap: it accepts the original function's call, moves the tensors to the kernel's layout and
back, and refuses arguments it cannot express to the kernel. A flex call's ``score_mod`` and
``block_mask`` go to a kernel that names them as they are, to any other as a dense mask.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn.functional as F

from surgery.errors import CallError
from surgery.tracing.twin import is_fake

def sdpa_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Any) -> torch.Tensor:
    """SDPA computed in float64 and rounded to ``q``'s dtype: a reference-precision kernel, to
    measure what a fast kernel costs (and one whose output differs from float32 kernels)."""
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **options).to(q.dtype)


#: ``kernel`` values accepted by name.
KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": F.scaled_dot_product_attention,
    "sdpa-float64": sdpa_float64,
}

#: Layout names: where the heads dimension is in the model's call.
LAYOUTS = ("BLHD", "BHLD")

# Tensor argument names, by position: (q, k, v) in flash-attention style functions, (query, key, value) in torch's.
_TENSORS = (("q", "query"), ("k", "key"), ("v", "value"))
# Keyword arguments the kernel receives, under the kernel's name.
_PASSED = {"softmax_scale": "scale", "scale": "scale", "causal": "is_causal", "is_causal": "is_causal",
           "dropout_p": "dropout_p", "attn_mask": "attn_mask", "score_mod": "score_mod", "block_mask": "block_mask"}
# Arguments that change nothing at these values; () for any value (the output dtype is q's, as the
# kernels return; flex's kernel_options are tuning hints).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "q_lens": (None,), "k_lens": (None,), "q_scale": (None,), "window_size": ((-1, -1),),
    "deterministic": (False, True), "dtype": (), "version": (None,), "fa_version": (None,),
    "score_mod": (None,), "block_mask": (None,), "enable_gqa": (False,), "return_lse": (False,),
    "kernel_options": (), "softmax_scale": (None,), "scale": (None,), "causal": (False,),
    "is_causal": (False,), "dropout_p": (0.0,), "attn_mask": (None,),
}


def resolve_kernel(kernel: Any) -> Callable[..., torch.Tensor]:
    """The kernel itself: ``kernel`` when callable, else the :data:`KERNELS` entry it names."""
    return kernel if callable(kernel) else KERNELS[kernel]


@dataclass(frozen=True)
class KernelCall:
    """The swapped-in replacement of one attention function (``name``) of a model.

    Calls ``kernel`` with the function's ``q, k, v`` in ``[B, heads, L, d]`` (contiguous, as
    fused kernels require) and returns its result in ``layout`` and in ``q``'s dtype.
    """

    name: str
    layout: str
    kernel: Callable[..., torch.Tensor]

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        tensors = list(args[:3])
        for position in range(len(tensors), 3):
            names = [n for n in _TENSORS[position] if n in kwargs]
            if not names:
                raise CallError(f"attention-swap: {self.name}() was called without its {_TENSORS[position][0]} "
                                "tensor", "pass q, k and v as the first three arguments or by name")
            tensors.append(kwargs.pop(names[0]))
        if len(args) > 3:
            raise CallError(f"attention-swap: {self.name}() was called with {len(args)} positional arguments, "
                            "whose meaning the swap cannot know", "pass the arguments after q, k, v by name")
        options: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in _NEUTRAL and (not _NEUTRAL[key] or any(_same(value, n) for n in _NEUTRAL[key])):
                continue
            if key not in _PASSED:
                raise CallError(f"attention-swap: {self.name}() was called with {key}={_show(value)}, which the "
                                "swapped kernel cannot take",
                                f"leave {self.name} out of the rule's targets (it keeps the model's kernel)")
            options[_PASSED[key]] = value
        q, k, v = tensors
        score_mod = None if _accepts(self.kernel, "score_mod") else options.pop("score_mod", None)
        block_mask = None if _accepts(self.kernel, "block_mask") else options.pop("block_mask", None)
        if score_mod is not None or block_mask is not None:
            heads_first = (q, k) if self.layout == "BHLD" else (q.transpose(1, 2), k.transpose(1, 2))
            options["attn_mask"] = dense_mask(self.name, *heads_first, score_mod, block_mask)
        if self.layout == "BLHD":
            q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            out = self.kernel(q, k, v, **options).transpose(1, 2).contiguous()
        else:
            out = self.kernel(q.contiguous(), k.contiguous(), v.contiguous(), **options)
        return out.to(tensors[0].dtype)


def dense_mask(name: str, q: torch.Tensor, k: torch.Tensor, score_mod: Any, block_mask: Any) -> torch.Tensor:
    """A flex call's ``score_mod`` and ``block_mask`` as one SDPA ``attn_mask`` ([B, heads, Lq, Lk]).

    SDPA adds a float mask to the scaled scores, so a ``score_mod`` must be additive
    (``score + bias(b, h, q, kv)``, as attention biases are); it is refused otherwise. The
    block mask's ``mask_mod`` gives the allowed pairs (the rest get ``-inf``). Both are
    evaluated on broadcast index grids, as flex evaluates them per element.
    """
    batch, heads, length_q, length_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    grid = [torch.arange(n, device=q.device).view(*(n if i == d else 1 for i in range(4)))
            for d, n in enumerate((batch, heads, length_q, length_k))]
    zero = torch.zeros(batch, heads, length_q, length_k, dtype=q.dtype, device=q.device)
    mask = zero
    if score_mod is not None:
        mask = score_mod(zero, *grid).to(q.dtype)
        if not is_fake(q) and q.device.type != "meta" and not torch.allclose(score_mod(zero + 1, *grid) - mask, zero + 1):
            raise CallError(f"attention-swap: {name}() was called with a score_mod that is not an additive bias, "
                            "which the swapped kernel cannot take",
                            f"leave {name} out of the rule's targets (it keeps the model's kernel)")
    if block_mask is not None:
        allowed = block_mask.mask_mod(*grid)
        mask = torch.where(allowed, mask, torch.full_like(mask, float("-inf")))
    return mask


@lru_cache(maxsize=None)
def _accepts(kernel: Callable[..., Any], name: str) -> bool:
    """Whether ``kernel`` names the keyword ``name`` (a flex-style kernel takes its masks as they are)."""
    try:
        return name in inspect.signature(kernel).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def _same(value: Any, neutral: Any) -> bool:
    return value is neutral or (type(value) is type(neutral) and value == neutral)


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__ if not isinstance(value, (int, float, bool, str, tuple)) else repr(value)


__all__ = ["KERNELS", "LAYOUTS", "KernelCall", "dense_mask", "resolve_kernel", "sdpa_float64"]
