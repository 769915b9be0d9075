"""The VACE branch's weights: its checks of a file against the model, and :func:`load_vace_weights`.

The engine's loader (:func:`surgery.weights.load_weights`) checks what holds for any grafted
weights; what only VACE knows is checked here, through the rule's ``check_weights``
(:func:`weight_checks`): the control context's width (``vace_in_dim``, the input channels of
the patch embedding), the number of VACE blocks against the model's, an all-zero patch
embedding (which would ignore the context), and diffusers names in a file meant for a model
with native keys.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.errors import WeightsError
from surgery.weights import DEFAULT_STRIP_PREFIXES, KeyMap, LoadReport, TensorEntry, WeightChecks, load_weights
from surgery.weights.values import all_zero

#: The VACE branch's modules in the native layout.
PATCH_EMBEDDING = "vace_patch_embedding"
BLOCKS = "vace_blocks"
DEFAULT_VACE_PREFIXES = (f"{BLOCKS}.", f"{PATCH_EMBEDDING}.")
LABEL = "VACE"
MISMATCH_FIX = "use the checkpoint built for this model's dim, ffn_dim and vace_layers, or pass a key_map for its layout"
# Names only diffusers' layout uses: a file of that layout meant for a model with native keys.
_DIFFUSERS_MARKERS = (".attn1.", ".attn2.", ".proj_in.", ".proj_out.", ".scale_shift_table", ".ffn.net.")


def block_indices(keys: Iterable[str], blocks: str = BLOCKS) -> list[int]:
    """Sorted distinct ``K`` of ``<blocks>.K.*`` keys."""
    pattern = re.compile(rf"^{re.escape(blocks)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def describe_blocks(indices: Sequence[int], blocks: str = BLOCKS) -> str:
    """Human form of a block index list: ``vace_blocks.0-14``, or an explicit list if not contiguous."""
    if not indices:
        return f"no {blocks}"
    if list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{blocks}.{indices[0]}-{indices[-1]}" if len(indices) > 1 else f"{blocks}.{indices[0]}"
    return f"{blocks} " + ",".join(map(str, indices))


def weight_checks(*, patch_embedding: str = PATCH_EMBEDDING, blocks: str = BLOCKS, diffusers_fix: bool = True,
                  expect_vace_in_dim: int | None = None, expect_blocks: int | None = None) -> WeightChecks:
    """The VACE rule's checks of a weights file against the model (``Rule.check_weights``).

    Args:
        patch_embedding, blocks: the names of the grafted embedding and block list.
        diffusers_fix: a file with diffusers names, for a model no rule rewrote, is told to
            use ``DIFFUSERS_TO_NATIVE`` (a model with native keys).
        expect_vace_in_dim, expect_blocks: optional expectations checked against the values
            inferred from the file.
    """
    patch_key = f"{patch_embedding}.weight"

    def fit(where: str, stored: Mapping[str, TensorEntry], held: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        patch = stored.get(patch_key)
        in_dim = patch.shape[1] if patch is not None and len(patch.shape) > 1 else None
        file_blocks = block_indices(stored, blocks)
        if expect_vace_in_dim is not None and in_dim != expect_vace_in_dim:
            raise WeightsError(
                f"{where} has vace_in_dim {in_dim} ({patch_key} shape {list(patch.shape) if patch else None}) but "
                f"{expect_vace_in_dim} was expected",
                "use a checkpoint with the expected vace_in_dim, or change the expectation",
            )
        if expect_blocks is not None and len(file_blocks) != expect_blocks:
            raise WeightsError(
                f"{where} has {len(file_blocks)} VACE blocks ({describe_blocks(file_blocks, blocks)}) but "
                f"{expect_blocks} were expected",
                "use the checkpoint matching vace_layers, or build the model with as many VACE layers as the file has",
            )
        model_patch = held.get(patch_key)
        if in_dim is not None and model_patch is not None and model_patch.dim() > 1 and model_patch.shape[1] != in_dim:
            model_in_dim = model_patch.shape[1]
            raise WeightsError(
                f"{where} has vace_in_dim {in_dim} but the model's {patch_key} takes {model_in_dim}",
                f"build the model with vace_in_dim={in_dim}, or use a checkpoint for vace_in_dim={model_in_dim}",
            )
        model_blocks = block_indices(held, blocks)
        if len(model_blocks) != len(file_blocks):
            raise WeightsError(
                f"{where} has {len(file_blocks)} VACE blocks ({describe_blocks(file_blocks, blocks)}) but the model "
                f"has {len(model_blocks)} ({describe_blocks(model_blocks, blocks)})",
                f"build the model with {len(file_blocks)} vace_layers, or use the checkpoint made for "
                f"{len(model_blocks)}",
            )
        return {"vace_in_dim": in_dim, "VACE blocks": len(file_blocks)}

    def value(key: str, entry: TensorEntry, converted: torch.Tensor) -> None:
        # Stored as zeros, or underflowed by the conversion: either way the context is ignored.
        if key == patch_key and all_zero(converted):
            raise WeightsError(
                f"{entry.file}: {entry.name!r} is all zeros in the model's "
                f"{str(converted.dtype).removeprefix('torch.')}, so the VACE context would be ignored",
                "this is an untrained or zero-initialised checkpoint; load the released VACE weights",
            )

    def layout_fix(unexpected: Sequence[str]) -> str | None:
        if diffusers_fix and any(m in k for k in unexpected for m in _DIFFUSERS_MARKERS):
            return "the file uses diffusers names: pass key_map=rules.vace.DIFFUSERS_TO_NATIVE"
        return None

    return WeightChecks(label=LABEL, fit=fit, value=value, layout_fix=layout_fix, mismatch_fix=MISMATCH_FIX)


def load_vace_weights(
    module: nn.Module,
    path: str | Path,
    *,
    key_map: KeyMap | None = None,
    strip_prefixes: Sequence[str] = DEFAULT_STRIP_PREFIXES,
    vace_prefixes: Sequence[str] = DEFAULT_VACE_PREFIXES,
    expect_vace_in_dim: int | None = None,
    expect_blocks: int | None = None,
    mmap: bool = False,
) -> LoadReport:
    """Load the VACE branch (``vace_blocks.*``, ``vace_patch_embedding.*``) from safetensors.

    :func:`surgery.weights.load_weights` with the VACE checks (:func:`weight_checks`); for a
    model the ``vace`` rule rewrote, ``surgery.weights.load_rule_weights`` does the same with
    the names of the model's family.

    Args:
        module: a module whose state_dict uses native keys (``vace_blocks.K.*`` ...).
            Its parameters may live on any device or on ``meta`` (loaded to CPU then).
        path: a VACE-only ``.safetensors`` file, a full checkpoint (filtered to the VACE
            keys), a ``*.safetensors.index.json``, or a directory holding either.
        key_map: ordered ``(pattern, replacement)`` rules applied after prefix stripping,
            e.g. :data:`rules.vace.DIFFUSERS_TO_NATIVE`.
        strip_prefixes: prefixes removed from stored names; the first match wins.
        vace_prefixes: which (mapped) keys belong to the VACE branch.
        expect_vace_in_dim, expect_blocks: optional expectations checked against the
            values inferred from the file.
        mmap: as for :func:`surgery.weights.load_weights` (opt-in; the default copies).

    Raises:
        WeightsError: everything :func:`surgery.weights.load_weights` refuses; a
            ``vace_in_dim`` or block count that differs from the model's or the expected
            one; an all-zero ``vace_patch_embedding.weight``.
        OrderError: the VACE modules already carry PEFT/LoRA layers.
    """
    checks = weight_checks(expect_vace_in_dim=expect_vace_in_dim, expect_blocks=expect_blocks)
    return load_weights(module, path, prefixes=tuple(vace_prefixes), key_map=key_map, strip_prefixes=strip_prefixes,
                        checks=checks, mmap=mmap)


__all__ = ["BLOCKS", "DEFAULT_VACE_PREFIXES", "LABEL", "PATCH_EMBEDDING", "block_indices", "describe_blocks",
           "load_vace_weights", "weight_checks"]
