"""Load VACE-branch weights from safetensors into a module with native VACE keys.

Validate first, then touch: every check (keys, shapes, counts, finiteness, ranges, the
all-zero patch embedding) runs on the memory-mapped file tensors before the module is
modified, so a bad file leaves the module exactly as it was.

How each tensor lands in the module:
* same dtype, CPU parameter, ``mmap=True``: the parameter is *replaced* by the mapped
  file tensor (assign-style, like ``load_state_dict(assign=True)``): no copy at all;
* parameter on ``meta``: replaced by a converted CPU tensor (there is nothing to copy into);
* otherwise (dtype or device differ, or ``mmap=False``): converted into fresh storage on
  the parameter's device with the copy kernel, then swapped in together with everything
  else, so even an interrupt half-way leaves the module as it was (at the cost of a
  transient second copy of the VACE branch, never of the base model).
"""
from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
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


def _converted(slot: _Slot, value: torch.Tensor) -> torch.Tensor:
    fresh = torch.empty_like(slot.tensor, device=slot.target_device)
    fresh.copy_(value)
    return fresh


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
            is on the CPU, the parameter becomes the file's memory-mapped tensor (no copy;
            copy-on-write, so writing the parameter never writes the file, but the file
            must not be truncated or rewritten in place while the model uses it).
            ``False`` copies into the existing parameter instead.

    Every tensor is converted to the dtype and device of the parameter it loads into
    (per tensor, so mixed-dtype checkpoints are fine); weights stay on the model's
    device. All checks run before the module is touched, so on any error the module is
    unchanged. (Only an interrupt or a device fault during the final copies could leave
    it partly loaded; replaced parameters are then restored.)

    Raises:
        WeightsError: unreadable or unsafe file, key/shape/count mismatch, NaN/Inf,
            overflow on conversion, or an all-zero ``vace_patch_embedding.weight``.
        OrderError: the VACE modules already carry PEFT/LoRA layers.
    """
    start = time.perf_counter()
    entries = resolve_checkpoint(path)
    selection = select_keys(entries, strip_prefixes=strip_prefixes, key_map=key_map, keep_prefixes=vace_prefixes)
    chosen = {k: entries[n] for k, n in selection.selected.items()}
    files = sorted({str(e.file) for e in (chosen or entries).values()})
    where = ", ".join(files)
    if not chosen:
        sample = _listing(sorted(entries), len(entries)) if entries else "no tensors"
        raise WeightsError(
            f"{where} holds no VACE keys ({', '.join(vace_prefixes)}) after prefix stripping; it has {sample}",
            "pass a VACE checkpoint (a VACE-only module or a full VACE model), or a key_map for its naming",
        )
    file_in_dim, file_blocks = _infer(chosen)
    _check_expectations(where, chosen, file_in_dim, file_blocks, expect_vace_in_dim, expect_blocks)

    slots = _module_slots(module, vace_prefixes)
    _check_model(where, slots, vace_prefixes, file_in_dim, file_blocks)
    plan = _plan(slots, chosen, files)

    counts = _Counts()
    with open_tensors({e.file for _, _, e in plan}) as handles:
        values = [_read_checked(handles, key, entry, slot) for slot, key, entry in plan]
        _commit(plan, values, mmap, counts)

    return LoadReport(
        files=tuple(files),
        tensors=len(plan),
        file_dtypes=dict(counts.file_dtypes),
        target_dtypes=dict(counts.target_dtypes),
        bytes_read=sum(e.nbytes for _, _, e in plan),
        seconds=time.perf_counter() - start,
        vace_in_dim=file_in_dim,
        blocks=len(file_blocks),
        ignored=selection.dropped,
        shared=counts.shared,
        converted=counts.converted,
        copied=counts.copied,
        key_map_rules=len(key_map or ()),
        devices=dict(counts.devices),
    )


def _infer(chosen: dict[str, TensorEntry]) -> tuple[int | None, list[int]]:
    """vace_in_dim (patch embedding input channels) and the VACE block indices of a file."""
    patch = chosen.get(PATCH_EMBEDDING_KEY)
    in_dim = patch.shape[1] if patch is not None and len(patch.shape) > 1 else None
    return in_dim, block_indices(chosen)


def _check_expectations(
    where: str,
    chosen: dict[str, TensorEntry],
    file_in_dim: int | None,
    file_blocks: list[int],
    expect_vace_in_dim: int | None,
    expect_blocks: int | None,
) -> None:
    if expect_vace_in_dim is not None and file_in_dim != expect_vace_in_dim:
        patch = chosen.get(PATCH_EMBEDDING_KEY)
        raise WeightsError(
            f"{where} has vace_in_dim {file_in_dim} ({PATCH_EMBEDDING_KEY} shape "
            f"{list(patch.shape) if patch else None}) but {expect_vace_in_dim} was expected",
            "use a checkpoint with the expected vace_in_dim, or change the expectation",
        )
    if expect_blocks is not None and len(file_blocks) != expect_blocks:
        raise WeightsError(
            f"{where} has {len(file_blocks)} VACE blocks ({describe_blocks(file_blocks)}) but {expect_blocks} were "
            "expected",
            "use the checkpoint matching vace_layers, or build the model with as many VACE layers as the file has",
        )


def _check_model(
    where: str, slots: dict[str, _Slot], vace_prefixes: Sequence[str], file_in_dim: int | None, file_blocks: list[int]
) -> None:
    """Model-level fit: a VACE branch exists, carries no LoRA, and has the file's in_dim and depth."""
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
    patch = slots.get(PATCH_EMBEDDING_KEY)
    if file_in_dim is not None and patch is not None and patch.tensor.dim() > 1:
        model_in_dim = patch.tensor.shape[1]
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


def _plan(
    slots: dict[str, _Slot], chosen: dict[str, TensorEntry], files: Sequence[str]
) -> list[tuple[_Slot, str, TensorEntry]]:
    """Pair every model slot with its file entry; all key and shape problems in one error."""
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
                f"{', '.join(files)} stores the aliased parameter {slot.keys[0]!r} under several names "
                f"({', '.join(present)})",
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
    return plan


def _read_checked(handles: Mapping[Path, object], key: str, entry: TensorEntry, slot: _Slot) -> torch.Tensor:
    """Read one mapped tensor and run the value checks on it (no copy)."""
    t = read_tensor(handles, entry)
    _check_values(key, entry, t, slot.tensor.dtype)
    if key == PATCH_EMBEDDING_KEY and not bool(t.any()):
        raise WeightsError(
            f"{entry.file}: {entry.name!r} is all zeros, so the VACE context would be ignored",
            "this is an untrained or zero-initialised checkpoint; load the released VACE weights",
        )
    return t


@dataclass
class _Counts:
    shared: int = 0
    converted: int = 0
    copied: int = 0
    file_dtypes: Counter[str] = field(default_factory=Counter)
    target_dtypes: Counter[str] = field(default_factory=Counter)
    devices: Counter[str] = field(default_factory=Counter)


def _commit(
    plan: list[tuple[_Slot, str, TensorEntry]], values: list[torch.Tensor], mmap: bool, counts: _Counts
) -> None:
    """Put the checked tensors into the module.

    Assign-style where dtype and device allow (the parameter becomes the mapped file
    tensor: no copy), and for meta parameters (nothing to copy into). Everything else is
    converted into fresh storage with the copy kernel (``empty_like(...).copy_``, as fast
    as copying in place) and swapped in only when every tensor is ready, so an interrupt
    or a device fault leaves the module exactly as it was. The price is a transient second
    copy of the grafted branch's parameters (not of the base model's).
    """
    assigns: list[tuple[_Slot, torch.Tensor]] = []
    copies: list[tuple[_Slot, torch.Tensor]] = []
    for (slot, _, _), t in zip(plan, values):
        dtype, device = slot.tensor.dtype, slot.target_device
        same = t.dtype == dtype and device.type == "cpu"
        if slot.tensor.device.type == "meta":
            assigns.append((slot, t.clone() if same and not mmap else t.to(device=device, dtype=dtype)))
        elif same and mmap:
            assigns.append((slot, t))
        else:
            copies.append((slot, t))
        if same and mmap:
            counts.shared += 1
        elif same:
            counts.copied += 1
        else:
            counts.converted += 1
        counts.file_dtypes[_dtype_name(t.dtype)] += 1
        counts.target_dtypes[_dtype_name(dtype)] += 1
        counts.devices[str(device)] += 1

    with torch.no_grad():
        for slot, t in copies:
            assigns.append((slot, _converted(slot, t)))
    done: list[tuple[_Slot, list[torch.Tensor]]] = []
    try:
        for slot, value in assigns:
            done.append((slot, [(o._parameters if slot.is_param else o._buffers)[a] for o, a in slot.owners]))
            _assign(slot, value)
    except BaseException:
        # Every check has passed by now, so only an interrupt lands here; put the previous
        # tensor objects back.
        for slot, before in reversed(done):
            for (owner, attr), old in zip(slot.owners, before):
                (owner._parameters if slot.is_param else owner._buffers)[attr] = old
        raise
