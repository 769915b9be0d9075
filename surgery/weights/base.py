"""Load a base model's weights (every key outside a rule's grafted modules) from safetensors.

A full checkpoint holds the base model and a rule's grafted modules in one file: ``blocks.*``,
..., ``head.*`` plus the keys under the rule's ``weight_prefixes`` (e.g. a VACE model's).
Its base loads into the model *before* surgery (the order is Base -> rules -> LoRA), the
rule's keys after surgery through :func:`~surgery.weights.load_rule_weights`.

The base load is :func:`~surgery.weights.loader.load_weights` restricted to the base keys, so
it has every one of its guarantees (regular files only, confined shards, floating-point
tensors only, values checked after conversion, private copies unless ``mmap=True``, all or
nothing). What this module adds is the fit of the *whole* base: every base parameter must be
in the file and every key of the file outside the rule's prefixes must be a base parameter,
checked from the headers before any tensor is read. A model built on ``meta`` loads here
without ever being initialised.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from surgery.errors import WeightsError
from surgery.weights.files import FLOAT_CODES, TensorEntry, resolve_checkpoint
from surgery.weights.keys import KeyMap, select_keys, under_prefixes
from surgery.weights.loader import DEFAULT_STRIP_PREFIXES, _fit_error, _listing, load_weights
from surgery.weights.report import LoadReport

#: The dtypes a model can be built in; a checkpoint whose base is all one of them sets the model's dtype.
MODEL_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def base_keys(
    names: Iterable[str],
    *,
    key_map: KeyMap | None = None,
    strip_prefixes: Sequence[str] = DEFAULT_STRIP_PREFIXES,
    rule_prefixes: Sequence[str] = (),
) -> dict[str, str]:
    """The base-model tensors among stored ``names``: model key -> stored name, the keys under
    ``rule_prefixes`` (a rule's ``weight_prefixes``, ``*`` parts included) left out.

    Empty for a file of the rule's weights alone. Two stored names that map to the same key are a
    :class:`WeightsError`.
    """
    selection = select_keys(names, strip_prefixes=strip_prefixes, key_map=key_map, keep_prefixes=("",))
    return {key: name for key, name in selection.selected.items() if not under_prefixes(key, rule_prefixes)}


def base_dtype(entries: Iterable[TensorEntry]) -> torch.dtype | None:
    """The dtype every one of ``entries`` is stored in, when it is float32, bfloat16 or float16; else ``None``."""
    codes = {entry.dtype for entry in entries}
    return MODEL_DTYPES.get(codes.pop()) if len(codes) == 1 else None


def _model_base(module: nn.Module, rule_prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    return {k: t for k, t in module.state_dict(keep_vars=True).items() if not under_prefixes(k, rule_prefixes)}


def _check_fit(where: str, model: dict[str, torch.Tensor], base: Mapping[str, TensorEntry]) -> None:
    """Every base parameter in the file (an alias under any of its names), nothing else, same shapes, floats."""
    names_of: dict[int, list[str]] = {}
    for key, tensor in model.items():
        names_of.setdefault(id(tensor), []).append(key)
    missing = [names[0] for names in names_of.values() if not any(n in base for n in names)]
    unexpected = sorted(k for k in base if k not in model)
    shapes = [f"{k}: {list(model[k].shape)} vs {list(e.shape)}" for k, e in base.items()
              if k in model and tuple(model[k].shape) != tuple(e.shape)]
    if missing or unexpected or shapes:
        raise _fit_error(missing, unexpected, shapes, [where], lambda unexpected: None, part="base")
    stored = [f"{e.name} ({e.dtype_name})" for e in base.values() if e.dtype not in FLOAT_CODES]
    if stored:
        raise WeightsError(f"{where}: {len(stored)} base tensors are not floating point ({_listing(stored)}), and "
                           "integer or bool values are never converted to weights",
                           "use a checkpoint that stores the weights as float32, bfloat16 or float16")


def load_base_weights(
    module: nn.Module,
    path: str | Path,
    *,
    key_map: KeyMap | None = None,
    strip_prefixes: Sequence[str] = DEFAULT_STRIP_PREFIXES,
    rule_prefixes: Sequence[str] = (),
    mmap: bool = False,
) -> LoadReport:
    """Load every parameter and buffer of ``module`` outside a rule's grafted modules from ``path``.

    Args:
        module: the base model (or a rewritten one: its keys under ``rule_prefixes`` are left
            alone). Its parameters may live on any device or on ``meta``; a ``meta`` model's
            weights land on the CPU in its dtypes, without any initialisation having run.
        path: a base checkpoint or a full one (its keys under ``rule_prefixes`` are counted
            as ignored), a ``*.safetensors.index.json``, or a directory holding either.
        rule_prefixes: the state_dict prefixes of the rule's grafted modules
            (``Rule.weight_prefixes``, ``*`` parts included), which a full checkpoint holds
            besides the base, possibly inside base modules (``blocks.*.ffn_adapter.``).
        key_map, strip_prefixes, mmap: as for :func:`~surgery.weights.loader.load_weights`.

    Raises:
        WeightsError: the file holds no base keys (only the rule's), a base parameter is
            missing from it, it holds keys the model does not have (outside
            ``rule_prefixes``), a shape differs, a base tensor is not floating point; and
            every refusal of :func:`~surgery.weights.loader.load_weights` (unsafe files,
            NaN/Inf, overflow, a file changed while read). On any error the module is unchanged.
    """
    entries = resolve_checkpoint(path)
    stored = base_keys(entries, key_map=key_map, strip_prefixes=strip_prefixes, rule_prefixes=rule_prefixes)
    base = {key: entries[name] for key, name in stored.items()}
    where = ", ".join(sorted({str(e.file) for e in (base or entries).values()}))
    if not base:
        raise WeightsError(f"{where} holds no base-model weights, only the rule's ({', '.join(rule_prefixes)})",
                           "load it with load_rule_weights after surgery, and the base model's checkpoint here")
    model = _model_base(module, rule_prefixes)
    _check_fit(where, model, base)
    # The base keys as load_weights' key filter: each top-level name (or a root-level key itself),
    # less the rule's keys, which may live under the same names (``blocks.*.ffn_adapter.``).
    top_level = tuple(sorted({k.split(".", 1)[0] + "." if "." in k else k for k in model}))
    return load_weights(module, path, prefixes=top_level, key_map=key_map, strip_prefixes=strip_prefixes,
                        label="base", mmap=mmap, exclude=tuple(rule_prefixes))


__all__ = ["MODEL_DTYPES", "base_dtype", "base_keys", "load_base_weights"]
