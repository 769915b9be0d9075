"""Load the weights of a rule's grafted modules from safetensors into a module with native keys.

Validate first, then touch: every check (keys, shapes, counts, floating-point dtypes,
finiteness and overflow of the converted values, the all-zero patch embedding) runs
before the module is modified, so a bad file leaves the module exactly as it was.

How each tensor lands in the module:
* by default it is read (copied, never mapped) into fresh storage in the parameter's
  dtype, converted chunk by chunk and checked while each chunk is in the CPU cache, then
  moved to the parameter's device; the copy does not change if the file does;
* ``mmap=True`` (opt-in), same dtype, CPU or ``meta`` parameter: the parameter is
  *replaced* by the file's memory-mapped tensor (assign-style, no copy at all);
* the new tensors are swapped in together only when every one is ready, so even an
  interrupt half-way leaves the module as it was (at the cost of a transient second
  copy of the loaded modules, never of the base model).

What only the rule knows (its branch's input width and depth, values that must not be all
zero) it checks itself through a :class:`~surgery.weights.checks.WeightChecks`, at the same
points: from the headers, then on each converted value, before the module is touched.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from surgery.errors import OrderError, WeightsError
from surgery.weights.files import (
    FLOAT_CODES,
    TensorEntry,
    TensorFile,
    fresh_cpu,
    open_tensors,
    read_tensor,
    resolve_checkpoint,
    torch_dtype,
)
from surgery.weights.checks import ValueCheck, WeightChecks
from surgery.weights.keys import KeyMap, select_keys, under_prefixes
from surgery.weights.report import LoadReport
from surgery.weights.values import all_finite

DEFAULT_STRIP_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
#: The fix for keys or shapes that do not fit, when neither a key map nor the rule explains them.
MISMATCH_FIX = "use the checkpoint made for this model, or pass a key_map for its layout"
_LIST_LIMIT = 6
_CPU = torch.device("cpu")
_PEFT_MARKERS = re.compile(r"\.(base_layer\.|lora_A\.|lora_B\.|lora_embedding_|lora_magnitude_)")
_NO_CHECKS = WeightChecks()


class _Slot:
    """One parameter or buffer of the module, reachable under one or more state_dict keys."""

    __slots__ = ("keys", "tensor", "is_param", "owners", "target_device")

    def __init__(self, tensor: torch.Tensor, is_param: bool) -> None:
        self.keys: list[str] = []
        self.tensor = tensor
        self.is_param = is_param
        self.owners: list[tuple[nn.Module, str]] = []
        # A meta-device module has no storage to keep; its weights land on the CPU.
        device = tensor.device
        self.target_device = _CPU if device.type == "meta" else device


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _listing(items: Sequence[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... (+{total - _LIST_LIMIT} more)" if total > _LIST_LIMIT else "")


def _module_slots(module: nn.Module, prefixes: Sequence[str], part: str,
                  exclude: Sequence[str] = ()) -> dict[str, _Slot]:
    """The parameters/buffers of ``module`` under ``prefixes`` and not under ``exclude`` by state_dict
    key; aliases share one slot."""
    by_id: dict[int, _Slot] = {}
    slots: dict[str, _Slot] = {}
    # One walk of the module tree instead of a get_submodule walk per key.
    modules = dict(module.named_modules(remove_duplicate=False))
    for key, tensor in module.state_dict(keep_vars=True).items():
        if not under_prefixes(key, prefixes) or under_prefixes(key, exclude):
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            raise WeightsError(
                f"state_dict key {key!r} does not name a submodule attribute, so it cannot be assigned",
                f"remove custom state_dict hooks from the {part} modules",
            )
        is_param = attr in owner._parameters
        registered = owner._parameters.get(attr) if is_param else owner._buffers.get(attr)
        if registered is None or registered is not tensor:
            raise WeightsError(
                f"state_dict key {key!r} is not a plain parameter or buffer of {type(owner).__name__}",
                f"remove custom state_dict hooks from the {part} modules",
            )
        slot = by_id.get(id(tensor))
        if slot is None:
            slot = by_id[id(tensor)] = _Slot(tensor, is_param)
        slot.keys.append(key)
        slot.owners.append((owner, attr))
        slots[key] = slot
    return slots


def _fit_error(missing: list[str], unexpected: list[str], shapes: list[str], files: Sequence[str],
               layout_fix: Callable[[list[str]], str | None], part: str,
               mismatch_fix: str | None = None) -> WeightsError:
    """All key and shape problems in one error; the fix names a key map that makes the keys fit
    (``layout_fix``), else ``mismatch_fix`` (the rule's), else :data:`MISMATCH_FIX`."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} {part} keys missing from the file ({_listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys in the file ({_listing(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches, model vs file ({_listing(shapes)})")
    fix = (layout_fix(unexpected) if missing or unexpected else None) or mismatch_fix or MISMATCH_FIX
    err = WeightsError(f"{', '.join(files)} does not fit the model: " + "; ".join(parts), fix)
    err.details = {"missing": missing, "unexpected": unexpected, "shape_mismatches": shapes}  # type: ignore[attr-defined]
    return err


def _nonfinite_error(key: str, entry: TensorEntry, converted: torch.Tensor, stored: torch.Tensor) -> WeightsError:
    """NaN/Inf found in converted values: stored in the file, or made by the conversion (overflow)."""
    if converted.dtype != stored.dtype and all_finite(stored):
        peak = float(stored.double().abs().max())
        narrow = torch.finfo(converted.dtype).max < torch.finfo(torch.float32).max
        return WeightsError(
            f"{entry.file}: tensor {entry.name!r} has |values| up to {peak:.4g}, beyond the "
            f"{_dtype_name(converted.dtype)} range of the model parameter {key!r}",
            "load into a float32 or bfloat16 model" if narrow
            else "values this large are not trained weights; re-export the checkpoint",
        )
    return WeightsError(
        f"{entry.file}: tensor {entry.name!r} (model key {key!r}) contains NaN or Inf values",
        "the checkpoint is corrupt; re-download or re-export it",
    )


def _check_chunk(key: str, entry: TensorEntry, converted: torch.Tensor, stored: torch.Tensor) -> None:
    """Refuse NaN/Inf in the values the model would get, including overflow by the conversion."""
    if not all_finite(converted):
        raise _nonfinite_error(key, entry, converted, stored)


def _assign(slot: _Slot, value: torch.Tensor) -> None:
    new: torch.Tensor = nn.Parameter(value, requires_grad=slot.tensor.requires_grad) if slot.is_param else value
    for owner, attr in slot.owners:
        (owner._parameters if slot.is_param else owner._buffers)[attr] = new


def _converted(slot: _Slot, file: TensorFile, key: str, entry: TensorEntry, check: ValueCheck | None) -> torch.Tensor:
    """A checked private copy of the stored tensor in the slot's dtype, on the slot's device.

    Read and converted in chunks into fresh CPU storage, each chunk checked while it is
    still in the cache; moved to the slot's device afterwards (fresh device storage).
    """
    out = fresh_cpu(entry.shape, slot.tensor.dtype)
    for converted, stored in file.fill(entry, out):
        _check_chunk(key, entry, converted, stored)
    if check is not None:
        check(key, entry, out)
    return out if slot.target_device.type == "cpu" else out.to(slot.target_device)


def load_weights(
    module: nn.Module,
    path: str | Path,
    *,
    prefixes: Sequence[str],
    key_map: KeyMap | None = None,
    strip_prefixes: Sequence[str] = DEFAULT_STRIP_PREFIXES,
    checks: WeightChecks | None = None,
    label: str = "grafted",
    mmap: bool = False,
    exclude: Sequence[str] = (),
) -> LoadReport:
    """Load the module's tensors under ``prefixes`` (a rule's grafted modules) from safetensors.

    Args:
        module: a module whose state_dict uses native keys. Its parameters may live on any
            device or on ``meta`` (loaded to CPU then).
        path: a ``.safetensors`` file holding those tensors alone or in a full checkpoint
            (filtered to ``prefixes``), a ``*.safetensors.index.json``, or a directory
            holding either. Pickle formats (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) are
            refused unopened.
        prefixes: which (mapped) keys to load: the state_dict prefixes of the grafted modules
            (``Rule.weight_prefixes``); a ``*`` part matches any one name part
            (:func:`~surgery.weights.keys.under_prefixes`).
        key_map: ordered ``(pattern, replacement)`` rules applied after prefix stripping
            (see :mod:`surgery.weights.keys`); e.g. one of ``Rule.key_maps``.
        strip_prefixes: prefixes removed from stored names; the first match wins.
        checks: the rule's own checks of the file against the model (``Rule.check_weights``).
        label: how messages name these weights when ``checks`` gives no label.
        mmap: ``False`` (the default) copies every tensor out of the file, so the loaded
            weights never change afterwards, whatever happens to the file. ``True`` is an
            opt-in that saves the copy (and its memory) where a stored tensor already has
            the dtype of a CPU parameter: the parameter becomes the file's memory-mapped
            tensor. It is copy-on-write (writing the parameter never writes the file), but
            until a page is written it *is* the file: a file rewritten in place changes
            the model's weights, and a truncated file makes the next access to them kill
            the process with ``SIGBUS``. Use it only for files nothing will modify.
        exclude: prefixes (patterns too) of keys left out of both the file and the module
            (a rule's keys, when the base model loads from a full checkpoint).

    Every tensor is converted to the dtype and device of the parameter it loads into
    (per tensor, so mixed-dtype checkpoints are fine); weights stay on the model's
    device. All checks run on the converted values, before the module is touched, so on
    any error the module is unchanged (an interrupt during the final swap restores the
    replaced parameters). Only regular files are opened: FIFOs, devices and sockets are
    refused unopened, and a sharded index may name only files in its own directory.

    Raises:
        WeightsError: unreadable, unsafe or non-regular file, shard outside the index's
            directory, key/shape mismatch, a tensor that is not floating point, NaN/Inf,
            overflow on conversion, a file modified while it is being read, or anything
            the rule's ``checks`` refuse.
        OrderError: the modules to load already carry PEFT/LoRA layers.
    """
    start = time.perf_counter()
    checks = checks or _NO_CHECKS
    part = checks.label or label
    entries = resolve_checkpoint(path)
    selection = select_keys(entries, strip_prefixes=strip_prefixes, key_map=key_map, keep_prefixes=prefixes)
    chosen = {k: entries[n] for k, n in selection.selected.items() if not under_prefixes(k, exclude)}
    files = sorted({str(e.file) for e in (chosen or entries).values()})
    where = ", ".join(files)
    if not chosen:
        sample = _listing(sorted(entries), len(entries)) if entries else "no tensors"
        raise WeightsError(
            f"{where} holds no {part} keys ({', '.join(prefixes)}) after prefix stripping; it has {sample}",
            f"pass a checkpoint that holds the {part} weights (alone or in a full model), or a key_map for its naming",
        )

    slots = _module_slots(module, prefixes, part, exclude)
    _check_model(where, slots, prefixes, part)
    facts = dict(checks.fit(where, chosen, {k: s.tensor for k, s in slots.items()})) if checks.fit else {}

    def layout_fix(unexpected: list[str]) -> str | None:
        return _layout_fix(module, entries, strip_prefixes, prefixes, slots, unexpected, checks, exclude)

    plan = _plan(slots, chosen, files, layout_fix, part, checks.mismatch_fix)

    shares = [_maps(slot, entry, mmap) for slot, _, entry in plan]
    with open_tensors({e.file for _, _, e in plan}, mmap=mmap) as handles:
        values = [_read_checked(handles, *step, share, checks.value) for step, share in zip(plan, shares)]
    _commit(plan, values)
    counts = _count(plan, shares)

    return LoadReport(
        files=tuple(files),
        tensors=len(plan),
        file_dtypes=dict(counts.file_dtypes),
        target_dtypes=dict(counts.target_dtypes),
        bytes_read=sum(e.nbytes for _, _, e in plan),
        seconds=time.perf_counter() - start,
        facts=facts,
        ignored=selection.dropped + len(selection.selected) - len(chosen),
        shared=counts.shared,
        converted=counts.converted,
        copied=counts.copied,
        key_map_rules=len(key_map or ()),
        devices=dict(counts.devices),
    )


def _check_model(where: str, slots: dict[str, _Slot], prefixes: Sequence[str], part: str) -> None:
    """Model-level fit: the modules to load exist and carry no LoRA."""
    if not slots:
        raise WeightsError(
            f"the model has no {part} parameters ({', '.join(prefixes)}) to load {where} into",
            f"graft the {part} modules first (apply the rule), then load their weights",
        )
    peft_keys = [k for k in slots if _PEFT_MARKERS.search(k)]
    if peft_keys:
        raise OrderError(
            f"the {part} modules already carry LoRA/PEFT layers (e.g. {peft_keys[0]!r}), so native {part} keys "
            "cannot load",
            f"keep the order Base -> {part} -> LoRA: load the {part} weights before injecting any LoRA",
        )


def _layout_fix(module: nn.Module, names: Iterable[str], strip_prefixes: Sequence[str],
                prefixes: Sequence[str], slots: dict[str, _Slot], unexpected: Sequence[str],
                checks: WeightChecks, exclude: Sequence[str] = ()) -> str | None:
    """The key map that makes the file's keys the module's, from the rule that rewrote the
    module (``Rule.key_maps``: its family's maps from other layouts), as a fix; for a module no
    rule rewrote, the rule's own guess from the stored names (``checks.layout_fix``); else None."""
    rule = getattr(getattr(module, "surgery_state", None), "rule", None)
    if rule is None:
        return checks.layout_fix(unexpected) if checks.layout_fix is not None else None
    for name, table in (getattr(rule, "key_maps", None) or {}).items():
        try:
            selection = select_keys(names, strip_prefixes=strip_prefixes, key_map=table, keep_prefixes=prefixes)
        except WeightsError:  # a map that makes keys collide is no candidate
            continue
        if {k for k in selection.selected if not under_prefixes(k, exclude)} == set(slots):
            return (f"the file uses the {name!r} layout: pass key_map=model.surgery_state.rule.key_maps[{name!r}] "
                    f"(a key map of rule {rule.name!r})")
    return None


def _plan(
    slots: dict[str, _Slot], chosen: dict[str, TensorEntry], files: Sequence[str],
    layout_fix: Callable[[list[str]], str | None], part: str, mismatch_fix: str | None,
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
        if slot.tensor.shape != entry.shape:  # torch.Size is a tuple
            shapes.append(f"{present[0]}: {list(slot.tensor.shape)} vs {list(entry.shape)}")
            continue
        plan.append((slot, present[0], entry))
    unexpected = sorted(k for k in chosen if k not in slots)
    if missing or unexpected or shapes:
        raise _fit_error(missing, unexpected, shapes, files, layout_fix, part, mismatch_fix)
    _check_dtypes(plan, files, part)
    return plan


def _check_dtypes(plan: list[tuple[_Slot, str, TensorEntry]], files: Sequence[str], part: str) -> None:
    """Only floating-point tensors load, into floating-point parameters (never a silent cast)."""
    stored = [f"{e.name} ({e.dtype_name})" for _, _, e in plan if e.dtype not in FLOAT_CODES]
    if stored:
        raise WeightsError(
            f"{', '.join(files)}: {len(stored)} tensors are not floating point ({_listing(stored)}), and integer "
            "or bool values are never converted to weights",
            f"use a checkpoint that stores the {part} weights as float32, bfloat16 or float16",
        )
    held = [f"{k} ({_dtype_name(s.tensor.dtype)})" for s, k, _ in plan if not s.tensor.is_floating_point()]
    if held:
        raise WeightsError(
            f"the model holds {len(held)} {part} tensors that are not floating point ({_listing(held)}), so "
            "weights cannot load into them without a silent cast",
            f"keep the {part} parameters and buffers in a floating-point dtype",
        )


def _maps(slot: _Slot, entry: TensorEntry, mmap: bool) -> bool:
    """Whether the slot takes the file's mapped tensor itself (``mmap=True``, same dtype, CPU)."""
    return mmap and slot.target_device.type == "cpu" and entry.torch_dtype == slot.tensor.dtype


def _read_checked(
    handles: Mapping[Path, TensorFile], slot: _Slot, key: str, entry: TensorEntry, share: bool, check: ValueCheck | None
) -> torch.Tensor:
    """The checked value the slot will get: the mapped file tensor (``share``, opt-in) or a checked copy."""
    if not share:
        return _converted(slot, handles[entry.file], key, entry, check)
    t = read_tensor(handles, entry)
    _check_chunk(key, entry, t, t)
    if check is not None:
        check(key, entry, t)
    return t


@dataclass
class _Counts:
    shared: int
    converted: int
    copied: int
    file_dtypes: Counter[str]
    target_dtypes: Counter[str]
    devices: Counter[str]


def _count(plan: list[tuple[_Slot, str, TensorEntry]], shares: list[bool]) -> _Counts:
    """How each tensor lands: shared with the file's mapping, copied as stored, or converted."""
    kinds = Counter(
        (share, entry.dtype, slot.tensor.dtype, slot.target_device) for (slot, _, entry), share in zip(plan, shares)
    )
    counts = _Counts(0, 0, 0, Counter(), Counter(), Counter())
    for (share, stored, held, device), n in kinds.items():  # a few kinds, not one per tensor
        if share:
            counts.shared += n
        elif torch_dtype(stored) == held and device.type == "cpu":
            counts.copied += n
        else:
            counts.converted += n
        counts.file_dtypes[_dtype_name(torch_dtype(stored))] += n
        counts.target_dtypes[_dtype_name(held)] += n
        counts.devices[str(device)] += n
    return counts


def _commit(plan: list[tuple[_Slot, str, TensorEntry]], values: list[torch.Tensor]) -> None:
    """Swap the checked tensors into the module, all or nothing.

    Every value is new storage (or the file's mapping); the old tensor objects are only
    replaced here, and put back if anything (an interrupt) stops the swap half-way.
    """
    done: list[tuple[_Slot, list[torch.Tensor]]] = []
    try:
        for (slot, _, _), value in zip(plan, values):
            done.append((slot, [(o._parameters if slot.is_param else o._buffers)[a] for o, a in slot.owners]))
            _assign(slot, value)
    except BaseException:
        # Every check has passed by now, so only an interrupt lands here; put the previous
        # tensor objects back.
        for slot, before in reversed(done):
            for (owner, attr), old in zip(slot.owners, before):
                (owner._parameters if slot.is_param else owner._buffers)[attr] = old
        raise
