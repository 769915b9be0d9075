"""Load VACE-branch weights from safetensors into a module with native VACE keys.

The load is transactional: every check (keys, shapes, counts, finiteness, ranges) runs
on the memory-mapped file tensors first, and the module is touched only when all of
them pass; if anything still fails while parameters are being swapped in, the swap is
undone. Parameters are replaced by assignment (as ``load_state_dict(assign=True)``
does) rather than copied into, so a tensor whose dtype already matches on a CPU model
costs no copy at all: the parameter keeps pointing into the file's memory map.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from surgery.errors import OrderError, WeightsError
from surgery.weights.files import TensorEntry, open_tensors, read_tensor, resolve_checkpoint
from surgery.weights.keys import KeyMap, block_indices, describe_blocks, select_keys
from surgery.weights.report import LoadReport

DEFAULT_STRIP_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DEFAULT_VACE_PREFIXES = ("vace_blocks.", "vace_patch_embedding.")
PATCH_EMBEDDING_KEY = "vace_patch_embedding.weight"
_LIST_LIMIT = 6
_PEFT_MARKERS = (".base_layer.", ".lora_A.", ".lora_B.", ".lora_embedding_", ".lora_magnitude_")
_DIFFUSERS_MARKERS = (".attn1.", ".attn2.", ".proj_in.", ".proj_out.", ".scale_shift_table", ".ffn.net.")


@dataclass
class _Slot:
    """One parameter or buffer of the module, reachable under one or more state_dict keys."""

    keys: list[str]
    tensor: torch.Tensor
    is_param: bool
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)

    @property
    def target_device(self) -> torch.device:
        # A meta-device module has no storage to keep; its weights land on the CPU.
        return torch.device("cpu") if self.tensor.device.type == "meta" else self.tensor.device


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _listing(items: Sequence[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... (+{total - _LIST_LIMIT} more)" if total > _LIST_LIMIT else "")


def _module_slots(module: nn.Module, prefixes: Sequence[str]) -> dict[str, _Slot]:
    """VACE parameters/buffers of ``module`` by state_dict key; aliases share one slot."""
    by_id: dict[int, _Slot] = {}
    slots: dict[str, _Slot] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if not key.startswith(tuple(prefixes)):
            continue
        owner_name, _, attr = key.rpartition(".")
        try:
            owner = module.get_submodule(owner_name) if owner_name else module
        except AttributeError as exc:
            raise WeightsError(
                f"state_dict key {key!r} does not name a submodule attribute, so it cannot be assigned",
                "remove custom state_dict hooks from the VACE modules",
            ) from exc
        is_param = attr in owner._parameters
        if not (is_param or attr in owner._buffers) or getattr(owner, attr) is not tensor:
            raise WeightsError(
                f"state_dict key {key!r} is not a plain parameter or buffer of {type(owner).__name__}",
                "remove custom state_dict hooks from the VACE modules",
            )
        slot = by_id.get(id(tensor))
        if slot is None:
            slot = by_id[id(tensor)] = _Slot([], tensor, is_param)
        slot.keys.append(key)
        slot.owners.append((owner, attr))
        slots[key] = slot
    return slots


def _fit_error(missing: list[str], unexpected: list[str], shapes: list[str], files: Sequence[str]) -> WeightsError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} VACE keys missing from the file ({_listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys in the file ({_listing(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches, model vs file ({_listing(shapes)})")
    if any(m in k for k in unexpected for m in _DIFFUSERS_MARKERS):
        fix = "the file uses diffusers names: pass key_map=rules.vace_keymaps.DIFFUSERS_TO_NATIVE"
    else:
        fix = "use the checkpoint built for this model's dim, ffn_dim and vace_layers, or pass a key_map for its layout"
    err = WeightsError(f"{', '.join(files)} does not fit the model: " + "; ".join(parts), fix)
    err.details = {"missing": missing, "unexpected": unexpected, "shape_mismatches": shapes}  # type: ignore[attr-defined]
    return err


def _extremes(t: torch.Tensor) -> tuple[float, float] | None:
    """(min, max) of a floating tensor; NaN or Inf show up in them. None for non-float or empty.

    One ``aminmax`` reduction reads the data once without allocating, about ten times
    faster on CPU than ``isfinite(t).all()``, and it also gives the range check for free.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return None
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.float()  # float8 kernels lack reductions
    lo, hi = torch.aminmax(t)
    return float(lo), float(hi)


def _check_values(key: str, entry: TensorEntry, t: torch.Tensor, target: torch.dtype) -> None:
    """Refuse NaN/Inf, and conversions that would overflow to inf (e.g. float32 -> float16)."""
    extremes = _extremes(t)
    if extremes is None:
        return
    lo, hi = extremes
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise WeightsError(
            f"{entry.file}: tensor {entry.name!r} (model key {key!r}) contains NaN or Inf values",
            "the checkpoint is corrupt; re-download or re-export it",
        )
    if target.is_floating_point:
        peak, limit = max(-lo, hi), torch.finfo(target).max
        if peak > limit:
            raise WeightsError(
                f"{entry.file}: tensor {entry.name!r} has |values| up to {peak:.4g}, beyond the "
                f"{_dtype_name(target)} range of the model parameter {key!r}",
                "load into a float32 or bfloat16 model",
            )


def _assign(slot: _Slot, value: torch.Tensor) -> None:
    new: torch.Tensor = nn.Parameter(value, requires_grad=slot.tensor.requires_grad) if slot.is_param else value
    for owner, attr in slot.owners:
        (owner._parameters if slot.is_param else owner._buffers)[attr] = new


def load_vace_weights(
    module: nn.Module,
    path: str | Path,
    *,
    key_map: KeyMap | None = None,
    strip_prefixes: Sequence[str] = DEFAULT_STRIP_PREFIXES,
    vace_prefixes: Sequence[str] = DEFAULT_VACE_PREFIXES,
    expect_vace_in_dim: int | None = None,
    expect_blocks: int | None = None,
    mmap: bool = True,
) -> LoadReport:
    """Load the VACE branch (``vace_blocks.*``, ``vace_patch_embedding.*``) from safetensors.

    Args:
        module: a module whose state_dict uses native keys (``vace_blocks.K.*`` ...).
            Its parameters may live on any device or on ``meta`` (loaded to CPU then).
        path: a VACE-only ``.safetensors`` file, a full checkpoint (filtered to the VACE
            keys), a ``*.safetensors.index.json``, or a directory holding either.
            Pickle formats (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) are refused unopened.
        key_map: ordered ``(pattern, replacement)`` rules applied after prefix stripping
            (see :mod:`surgery.weights.keys`); e.g. ``rules.vace_keymaps.DIFFUSERS_TO_NATIVE``.
        strip_prefixes: prefixes removed from stored names; the first match wins.
        vace_prefixes: which (mapped) keys belong to the VACE branch.
        expect_vace_in_dim, expect_blocks: optional expectations checked against the
            values inferred from the file.
        mmap: when a stored tensor already has the parameter's dtype and the parameter
            is on the CPU, the parameter shares the file's memory map (no copy; the file
            must not be modified while the model uses it). ``False`` makes one private copy.

    Every tensor is converted to the dtype (and device) of the parameter it replaces,
    so mixed-dtype checkpoints are fine. On any error the module is left unchanged.

    Raises:
        WeightsError: unreadable or unsafe file, key/shape/count mismatch, NaN/Inf,
            overflow on conversion, or an all-zero ``vace_patch_embedding.weight``.
        OrderError: the VACE modules already carry PEFT/LoRA layers.
    """
    start = time.perf_counter()
    entries = resolve_checkpoint(path)
    selection = select_keys(
        entries, strip_prefixes=strip_prefixes, key_map=key_map, keep_prefixes=vace_prefixes
    )
    chosen: dict[str, TensorEntry] = {k: entries[n] for k, n in selection.selected.items()}
    files = sorted({str(e.file) for e in chosen.values()}) or sorted({str(e.file) for e in entries.values()})
    where = ", ".join(files)
    if not chosen:
        sample = _listing(sorted(entries), len(entries)) if entries else "no tensors"
        raise WeightsError(
            f"{where} holds no VACE keys ({', '.join(vace_prefixes)}) after prefix stripping; it has {sample}",
            "pass a VACE checkpoint (a VACE-only module or a full VACE model), or a key_map for its naming",
        )

    file_blocks = block_indices(chosen)
    patch = chosen.get(PATCH_EMBEDDING_KEY)
    file_in_dim = patch.shape[1] if patch is not None and len(patch.shape) > 1 else None
    if expect_vace_in_dim is not None and file_in_dim != expect_vace_in_dim:
        raise WeightsError(
            f"{where} has vace_in_dim {file_in_dim} ({PATCH_EMBEDDING_KEY} shape {list(patch.shape) if patch else None})"
            f" but {expect_vace_in_dim} was expected",
            "use a checkpoint with the expected vace_in_dim, or change the expectation",
        )
    if expect_blocks is not None and len(file_blocks) != expect_blocks:
        raise WeightsError(
            f"{where} has {len(file_blocks)} VACE blocks ({describe_blocks(file_blocks)}) but {expect_blocks} were "
            "expected",
            "use the checkpoint matching vace_layers, or build the model with as many VACE layers as the file has",
        )

    slots = _module_slots(module, vace_prefixes)
    if not slots:
        raise WeightsError(
            f"the model has no VACE parameters ({', '.join(vace_prefixes)}) to load {where} into",
            "graft the VACE branch first, then load its weights",
        )
    peft_keys = [k for k in slots if any(m in k for m in _PEFT_MARKERS)]
    if peft_keys:
        raise OrderError(
            f"the VACE modules already carry LoRA/PEFT layers (e.g. {peft_keys[0]!r}), so native VACE keys cannot load",
            "keep the order Base -> VACE -> LoRA: load the VACE weights before injecting any LoRA",
        )
    model_patch = slots.get(PATCH_EMBEDDING_KEY)
    if file_in_dim is not None and model_patch is not None and model_patch.tensor.dim() > 1:
        model_in_dim = model_patch.tensor.shape[1]
        if model_in_dim != file_in_dim:
            raise WeightsError(
                f"{where} has vace_in_dim {file_in_dim} but the model's {PATCH_EMBEDDING_KEY} takes {model_in_dim}",
                f"build the model with vace_in_dim={file_in_dim}, or use a checkpoint for vace_in_dim={model_in_dim}",
            )
    model_blocks = block_indices(slots)
    if len(model_blocks) != len(file_blocks):
        raise WeightsError(
            f"{where} has {len(file_blocks)} VACE blocks ({describe_blocks(file_blocks)}) but the model has "
            f"{len(model_blocks)} ({describe_blocks(model_blocks)})",
            f"build the model with {len(file_blocks)} vace_layers, or use the checkpoint made for "
            f"{len(model_blocks)}",
        )

    plan: list[tuple[_Slot, str, TensorEntry]] = []
    seen: set[int] = set()
    missing: list[str] = []
    shapes: list[str] = []
    for key, slot in slots.items():
        if id(slot) in seen:
            continue
        seen.add(id(slot))
        present = [k for k in slot.keys if k in chosen]
        if not present:
            missing.append(key)
            continue
        if len(present) > 1:
            raise WeightsError(
                f"{where} stores the aliased parameter {slot.keys[0]!r} under several names ({', '.join(present)})",
                "keep one name per tensor in the checkpoint",
            )
        entry = chosen[present[0]]
        if tuple(slot.tensor.shape) != entry.shape:
            shapes.append(f"{present[0]}: {list(slot.tensor.shape)} vs {list(entry.shape)}")
            continue
        plan.append((slot, present[0], entry))
    unexpected = sorted(k for k in chosen if k not in slots)
    if missing or unexpected or shapes:
        raise _fit_error(missing, unexpected, shapes, files)

    file_dtypes: Counter[str] = Counter()
    target_dtypes: Counter[str] = Counter()
    devices: Counter[str] = Counter()
    with open_tensors({e.file for _, _, e in plan}) as handles:
        values: list[torch.Tensor] = []
        for slot, key, entry in plan:
            t = read_tensor(handles, entry)
            _check_values(key, entry, t, slot.tensor.dtype)
            if key == PATCH_EMBEDDING_KEY and not bool(t.any()):
                raise WeightsError(
                    f"{entry.file}: {entry.name!r} is all zeros, so the VACE context would be ignored",
                    "this is an untrained or zero-initialised checkpoint; load the released VACE weights",
                )
            values.append(t)

        shared = converted = copied = 0
        done: list[tuple[_Slot, dict[tuple[int, str], torch.Tensor]]] = []
        try:
            for (slot, _, entry), t in zip(plan, values):
                dtype, device = slot.tensor.dtype, slot.target_device
                if t.dtype == dtype and device.type == "cpu":
                    if mmap:
                        value, shared = t, shared + 1
                    else:
                        value, copied = t.clone(), copied + 1
                else:
                    value, converted = t.to(device=device, dtype=dtype), converted + 1
                before = {
                    (id(o), a): (o._parameters if slot.is_param else o._buffers)[a] for o, a in slot.owners
                }
                done.append((slot, before))
                _assign(slot, value)
                file_dtypes[_dtype_name(t.dtype)] += 1
                target_dtypes[_dtype_name(dtype)] += 1
                devices[str(device)] += 1
        except BaseException:
            # Undo in reverse so the module is exactly as before (same tensor objects).
            for slot, before in reversed(done):
                for owner, attr in slot.owners:
                    (owner._parameters if slot.is_param else owner._buffers)[attr] = before[(id(owner), attr)]
            raise

    return LoadReport(
        files=tuple(files),
        tensors=len(plan),
        file_dtypes=dict(file_dtypes),
        target_dtypes=dict(target_dtypes),
        bytes_read=sum(e.nbytes for _, _, e in plan),
        seconds=time.perf_counter() - start,
        vace_in_dim=file_in_dim,
        blocks=len(file_blocks),
        ignored=selection.dropped,
        shared=shared,
        converted=converted,
        copied=copied,
        key_map_rules=len(key_map or ()),
        devices=dict(devices),
    )

