"""Load a LoRA safetensors file into a module with native keys, through PEFT.

The adapter is injected in place with ``peft.inject_adapter_in_model`` using the exact
module names found in the file (a ``re.fullmatch`` alternation, so ``blocks.0.self_attn.q``
can never also hit ``vace_blocks.0.self_attn.q``), then the stored A/B matrices are
copied into the fresh PEFT layers unchanged. ``alpha`` is kept as PEFT's ``lora_alpha``
(scaling = scale * alpha / rank), so ``layer.set_scale(adapter, s)`` still works later.
"""
from __future__ import annotations

import re
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from surgery.errors import WeightsError
from surgery.lora.keys import DEFAULT_LORA_PREFIXES, parse_lora_keys
from surgery.lora.report import LoraLoadReport
from surgery.weights.files import open_tensors, read_tensor, resolve_checkpoint
from surgery.weights.keys import KeyMap

_LIST_LIMIT = 6


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def _exact(names: Sequence[str]) -> str:
    return "|".join(re.escape(n) for n in names)


def load_lora_file(
    module: nn.Module,
    path: str | Path,
    *,
    adapter_name: str = "default",
    scale: float = 1.0,
    vace_layers: Sequence[int] | None = None,
    key_map: KeyMap | None = None,
    strip_prefixes: Sequence[str] = DEFAULT_LORA_PREFIXES,
) -> LoraLoadReport:
    """Inject the LoRA stored at ``path`` into ``module`` (in place) as adapter ``adapter_name``.

    Accepted key schemes: ``<target>.lora_A/lora_B.weight`` (optionally with the adapter
    name inside, ``lora_A.default.weight``), ``lora_down/lora_up``, optional ``.alpha``,
    with or without a ``diffusion_model.``/``model.diffusion_model.``/``base_model.model.``/
    ``transformer.`` prefix; targets under ``blocks.N`` and ``vace_blocks.K``; and the
    ``blocks.N.vace.*`` scheme, mapped to ``vace_blocks.K`` through ``vace_layers`` (taken
    from ``module.vace_layers`` when not given). ``key_map`` renames other layouts (e.g.
    ``rules.vace_keymaps.DIFFUSERS_TO_NATIVE``).

    Returns a report whose ``model`` is ``module`` itself (PEFT layers injected in place,
    not a ``PeftModel``). The new adapter is made active next to any adapters already
    active on the same layers. ``requires_grad`` of the existing parameters is left as it
    was (PEFT would otherwise freeze everything but the adapter).

    Everything (keys, targets, shapes, NaN/Inf) is checked before PEFT is called, so on
    an error the module is unchanged.

    Raises:
        WeightsError: unreadable/unsafe file, unknown keys, missing or non-Linear targets,
            rank/shape mismatch, NaN/Inf, or an adapter name already in use.
    """
    from peft import LoraConfig, PeftModel, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    start = time.perf_counter()
    if isinstance(module, (PeftModel, BaseTuner)):
        raise WeightsError(
            f"load_lora_file got a {type(module).__name__}; it injects into a plain module in place",
            "pass the underlying module (peft_model.get_base_model())",
        )
    entries = resolve_checkpoint(path)
    files = tuple(sorted({str(e.file) for e in entries.values()}))
    where = ", ".join(files)
    if vace_layers is None:
        vace_layers = getattr(module, "vace_layers", None)
    parsed = parse_lora_keys(entries, strip_prefixes=strip_prefixes, key_map=key_map, vace_layers=vace_layers)
    if parsed.unrecognized:
        raise WeightsError(
            f"{where} has {len(parsed.unrecognized)} keys that are not LoRA A/B/alpha tensors "
            f"({_listing(sorted(parsed.unrecognized))})",
            "only lora_A/lora_B, lora_down/lora_up and alpha tensors are supported; remove the others "
            "(e.g. full-weight .diff tensors) from the file",
        )
    if not parsed.targets:
        raise WeightsError(f"{where} holds no LoRA tensors", "pass a LoRA safetensors file")
    incomplete = sorted(t for t, g in parsed.targets.items() if not {"A", "B"} <= g.names.keys())
    if incomplete:
        raise WeightsError(
            f"{where}: {len(incomplete)} LoRA targets lack an A or B matrix ({_listing(incomplete)})",
            "the file is incomplete; re-export the LoRA",
        )
    used = sorted(n for n, m in module.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A)
    if used:
        raise WeightsError(
            f"adapter {adapter_name!r} is already loaded (e.g. on {used[0]!r})",
            "pass a different adapter_name for each LoRA file",
        )

    missing: list[str] = []
    not_linear: list[str] = []
    shape_errors: list[str] = []
    layers: dict[str, nn.Linear] = {}
    for target in parsed.targets:
        try:
            sub = module.get_submodule(target)
        except AttributeError:
            missing.append(target)
            continue
        base = sub.get_base_layer() if isinstance(sub, BaseTunerLayer) else sub
        if not isinstance(base, nn.Linear):
            not_linear.append(f"{target} ({type(base).__name__})")
            continue
        layers[target] = base
    if missing or not_linear:
        parts = []
        if missing:
            parts.append(f"{len(missing)} targets not in the model ({_listing(sorted(missing))})")
        if not_linear:
            parts.append(f"{len(not_linear)} targets are not nn.Linear ({_listing(sorted(not_linear))})")
        raise WeightsError(
            f"{where} does not fit the model: " + "; ".join(parts),
            "use a LoRA trained for this model layout, or a key_map/vace_layers that maps its names",
        )

    values: dict[str, dict[str, torch.Tensor]] = {}
    with open_tensors({e.file for e in entries.values()}) as handles:
        for target, group in parsed.targets.items():
            got = {role: read_tensor(handles, entries[name]).clone() for role, name in group.names.items()}
            for role, t in got.items():
                if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
                    raise WeightsError(
                        f"{where}: LoRA tensor {group.names[role]!r} contains NaN or Inf values",
                        "the LoRA file is corrupt; re-download or re-export it",
                    )
            a, b, linear = got["A"], got["B"], layers[target]
            rank = a.shape[0] if a.dim() == 2 else -1
            if (
                a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (rank, linear.in_features)
                or tuple(b.shape) != (linear.out_features, rank)
            ):
                shape_errors.append(
                    f"{target}: A {list(a.shape)} B {list(b.shape)} vs Linear({linear.in_features}, "
                    f"{linear.out_features})"
                )
            if "alpha" in got and got["alpha"].numel() != 1:
                shape_errors.append(f"{target}: alpha has shape {list(got['alpha'].shape)}, expected a scalar")
            values[target] = got
    if shape_errors:
        raise WeightsError(
            f"{where}: {len(shape_errors)} LoRA targets have matrices that do not fit "
            f"(A must be [rank, in], B [out, rank]): {_listing(shape_errors)}",
            "use the LoRA trained for this model's dimensions",
        )

    ranks = {t: int(v["A"].shape[0]) for t, v in values.items()}
    alphas = {t: float(v["alpha"].reshape(())) if "alpha" in v else float(ranks[t]) for t, v in values.items()}
    rank0 = Counter(ranks.values()).most_common(1)[0][0]
    targets = sorted(values)
    config = LoraConfig(
        r=rank0,
        lora_alpha=rank0,
        target_modules=_exact(targets),
        rank_pattern={re.escape(t): r for t, r in ranks.items() if r != rank0},
        alpha_pattern={re.escape(t): a for t, a in alphas.items() if a != rank0},
        lora_dropout=0.0,
        bias="none",
    )
    # By identity: PEFT renames wrapped weights (q.weight -> q.base_layer.weight).
    flags = [(p, p.requires_grad) for p in module.parameters()]
    # PEFT activates only the new adapter on every LoRA layer; remember what was active.
    active_before = {id(m): list(m.active_adapters) for m in module.modules() if isinstance(m, LoraLayer)}
    with warnings.catch_warnings():
        # A second adapter legitimately finds the first one's peft_config on the module.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, module, adapter_name=adapter_name)

    injected = {n: m for n, m in module.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
    if set(injected) != set(targets):
        raise WeightsError(
            f"PEFT injected adapter {adapter_name!r} into {len(injected)} modules instead of the {len(targets)} "
            "named in the file",
            "report this as a bug together with the peft version",
        )
    dtypes: Counter[str] = Counter()
    with torch.no_grad():
        for target in targets:
            layer = injected[target]
            for role, holder in (("A", layer.lora_A), ("B", layer.lora_B)):
                weight = holder[adapter_name].weight
                weight.copy_(values[target][role])
                dtypes[str(weight.dtype).removeprefix("torch.")] += 1
            layer.set_scale(adapter_name, scale)
    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            active = [a for a in active_before.get(id(layer), []) if a in layer.lora_A]
            if adapter_name in layer.lora_A:
                active.append(adapter_name)
            if active and list(layer.active_adapters) != active:
                layer.set_adapter(active)
    for p, flag in flags:
        p.requires_grad_(flag)

    return LoraLoadReport(
        model=module,
        adapter_name=adapter_name,
        files=files,
        schemes=tuple(sorted(parsed.schemes)),
        targets=tuple(targets),
        ranks=dict(Counter(ranks.values())),
        with_alpha=sum("alpha" in v for v in values.values()),
        scale=float(scale),
        tensors=sum(len(v) for v in values.values()),
        lora_dtypes=dict(dtypes),
        seconds=time.perf_counter() - start,
    )
