"""Read and check a whole LoRA file against a module before anything is injected.

:func:`plan_lora` returns everything the injection needs (targets, A/B values, ranks,
alphas, the dtype PEFT will give each adapter) or raises one :class:`WeightsError` that
lists every malformed target. Values are checked in the file's dtype *and* after
conversion to the adapter's dtype, because a LoRA that is finite in float32 can overflow
to inf in a float16 model.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from surgery.errors import WeightsError
from surgery.lora.keys import LoraTarget, TargetScheme, parse_lora_keys
from surgery.weights.files import TensorEntry, open_tensors, read_tensor, resolve_checkpoint
from surgery.weights.keys import KeyMap

_LIST_LIMIT = 6


def listing(items: Sequence[str]) -> str:
    """At most six items, then how many more."""
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


@dataclass
class LoraPlan:
    """A checked LoRA file: per target (sorted module names) its A/B (file values), rank, alpha and adapter dtype."""

    files: tuple[str, ...]
    schemes: tuple[str, ...]
    values: dict[str, dict[str, torch.Tensor]]
    ranks: dict[str, int]
    alphas: dict[str, float]
    dtypes: dict[str, torch.dtype]

    @property
    def targets(self) -> list[str]:
        return sorted(self.values)

    def scaling(self, target: str, scale: float) -> float:
        """PEFT's scaling of ``target``: ``scale * alpha / rank``."""
        return scale * self.alphas[target] / self.ranks[target]


def adapter_dtype(linear: nn.Linear) -> torch.dtype:
    """The dtype PEFT gives a new adapter on ``linear``: the base weight's if floating, else the default."""
    dtype = linear.weight.dtype
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _linear_targets(module: nn.Module, targets: Sequence[str], where: str) -> dict[str, nn.Linear]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    missing: list[str] = []
    not_linear: list[str] = []
    layers: dict[str, nn.Linear] = {}
    for target in targets:
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
            parts.append(f"{len(missing)} targets not in the model ({listing(sorted(missing))})")
        if not_linear:
            parts.append(f"{len(not_linear)} targets are not nn.Linear ({listing(sorted(not_linear))})")
        raise WeightsError(
            f"{where} does not fit the model: " + "; ".join(parts),
            "use a LoRA trained for this model layout, or a key_map (or the rule's schemes) that maps its names",
        )
    return layers


def _read_values(group: LoraTarget, entries: dict[str, TensorEntry], handles: object,
                 where: str) -> dict[str, torch.Tensor]:
    got = {role: read_tensor(handles, entries[name]).clone() for role, name in group.names.items()}  # type: ignore[arg-type]
    for role, t in got.items():
        numeric = t.is_floating_point() or (role == "alpha" and t.dtype != torch.bool and not t.is_complex())
        if not numeric:
            raise WeightsError(f"{where}: LoRA tensor {group.names[role]!r} has dtype {t.dtype}; "
                               f"{'alpha must be a real number' if role == 'alpha' else 'A/B must be floating point'}",
                               "the LoRA file is malformed; re-export it")
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            raise WeightsError(
                f"{where}: LoRA tensor {group.names[role]!r} contains NaN or Inf values",
                "the LoRA file is corrupt; re-download or re-export it",
            )
    return got


def _shape_problem(target: str, got: dict[str, torch.Tensor], linear: nn.Linear) -> str | None:
    a, b = got["A"], got["B"]
    rank = a.shape[0] if a.dim() == 2 else -1
    if (a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (rank, linear.in_features)
            or tuple(b.shape) != (linear.out_features, rank)):
        return f"{target}: A {list(a.shape)} B {list(b.shape)} vs Linear({linear.in_features}, {linear.out_features})"
    if "alpha" in got and got["alpha"].numel() != 1:
        return f"{target}: alpha has shape {list(got['alpha'].shape)}, expected a scalar"
    return None


def _range_problems(plan: LoraPlan, scale: float) -> list[str]:
    """Targets whose scaling, A/B values or update ``B @ A * scaling`` do not fit their adapter dtype."""
    problems: list[str] = []
    for target in plan.targets:
        dtype = plan.dtypes[target]
        top = torch.finfo(dtype).max
        scaling = plan.scaling(target, scale)
        name = str(dtype).removeprefix("torch.")
        if not (math.isfinite(scaling) and abs(scaling) <= top):
            problems.append(f"{target}: scaling {scaling:g} (scale {scale:g} * alpha {plan.alphas[target]:g} / rank "
                            f"{plan.ranks[target]}) is beyond {name}")
            continue
        a, b = plan.values[target]["A"], plan.values[target]["B"]
        if not all(bool(torch.isfinite(t.to(dtype)).all()) for t in (a, b)):
            problems.append(f"{target}: A/B values overflow {name} (largest |value| "
                            f"{max(float(a.abs().max()), float(b.abs().max())):g})")
            continue
        # |B @ A| <= rank * max|A| * max|B|: the exact product is needed only when the bound is out of range.
        bound = plan.ranks[target] * float(a.abs().max()) * float(b.abs().max()) * abs(scaling)
        if bound > top:
            largest = float((b.double() @ a.double()).abs().max()) * abs(scaling)
            if not largest <= top:
                problems.append(f"{target}: the update B @ A * scaling reaches {largest:g}, beyond {name}")
    return problems


def plan_lora(
    module: nn.Module,
    path: str,
    *,
    scale: float,
    schemes: Sequence[TargetScheme],
    key_map: KeyMap | None,
    strip_prefixes: Sequence[str],
) -> LoraPlan:
    """Read the LoRA at ``path`` and check every pair against ``module``; nothing is modified.

    Raises:
        WeightsError: unreadable/unsafe file, unknown keys, missing or non-Linear targets,
            rank 0, A/B shapes that do not fit, NaN/Inf, or values, scalings or updates
            that overflow the adapter dtype.
    """
    entries = resolve_checkpoint(path)
    files = tuple(sorted({str(e.file) for e in entries.values()}))
    where = ", ".join(files)
    parsed = parse_lora_keys(entries, strip_prefixes=strip_prefixes, key_map=key_map, schemes=schemes)
    if parsed.unrecognized:
        raise WeightsError(
            f"{where} has {len(parsed.unrecognized)} keys that are not LoRA A/B/alpha tensors "
            f"({listing(sorted(parsed.unrecognized))})",
            "only lora_A/lora_B, lora_down/lora_up and alpha tensors are supported; remove the others "
            "(e.g. full-weight .diff tensors) from the file",
        )
    if not parsed.targets:
        raise WeightsError(f"{where} holds no LoRA tensors", "pass a LoRA safetensors file")
    incomplete = sorted(t for t, g in parsed.targets.items() if not {"A", "B"} <= g.names.keys())
    if incomplete:
        raise WeightsError(
            f"{where}: {len(incomplete)} LoRA targets lack an A or B matrix ({listing(incomplete)})",
            "the file is incomplete; re-export the LoRA",
        )
    layers = _linear_targets(module, list(parsed.targets), where)

    values: dict[str, dict[str, torch.Tensor]] = {}
    shape_errors: list[str] = []
    with open_tensors({e.file for e in entries.values()}) as handles:
        for target, group in parsed.targets.items():
            values[target] = _read_values(group, entries, handles, where)
            problem = _shape_problem(target, values[target], layers[target])
            if problem:
                shape_errors.append(problem)
    if shape_errors:
        raise WeightsError(
            f"{where}: {len(shape_errors)} LoRA targets have matrices that do not fit "
            f"(A must be [rank, in], B [out, rank]): {listing(shape_errors)}",
            "use the LoRA trained for this model's dimensions",
        )
    ranks = {t: int(v["A"].shape[0]) for t, v in values.items()}
    empty = sorted(t for t, r in ranks.items() if r == 0)
    if empty:
        raise WeightsError(f"{where}: {len(empty)} LoRA targets have rank 0 (A [0, in], B [out, 0]): "
                           f"{listing(empty)}", "a LoRA pair needs rank >= 1; re-export the LoRA without them")
    alphas = {t: float(v["alpha"].reshape(())) if "alpha" in v else float(ranks[t]) for t, v in values.items()}
    plan = LoraPlan(files, tuple(sorted(parsed.schemes)), values, ranks, alphas,
                    {t: adapter_dtype(layers[t]) for t in values})
    problems = _range_problems(plan, scale)
    if problems:
        raise WeightsError(f"{where}: {len(problems)} LoRA targets do not fit the model's dtype: {listing(problems)}",
                           "use a smaller scale, or a LoRA exported for this dtype")
    return plan


__all__ = ["LoraPlan", "adapter_dtype", "listing", "plan_lora"]
