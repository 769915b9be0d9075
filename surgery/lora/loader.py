"""Load a LoRA safetensors file into a module with native keys, through PEFT.

The adapter is injected in place with ``peft.inject_adapter_in_model`` using the exact
module names found in the file (a ``re.fullmatch`` alternation, so ``blocks.0.self_attn.q``
can never also hit a grafted ``x_blocks.0.self_attn.q``), then the stored A/B matrices are
copied into the fresh PEFT layers unchanged. ``alpha`` is kept as PEFT's ``lora_alpha``
(scaling = scale * alpha / rank), so ``layer.set_scale(adapter, s)`` still works later.

Loading is all or nothing, like the rule weights loader: the arguments and the whole file
are checked first (:mod:`surgery.lora.plan`), and if the injection itself fails or is
interrupted half-way, every module is put back as it was (:mod:`surgery.lora.transaction`),
so the same call can simply be retried.
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
from surgery.lora.arguments import check_adapter_name, check_path, check_scale, check_strip_prefixes
from surgery.lora.keys import DEFAULT_LORA_PREFIXES, TargetScheme
from surgery.lora.plan import LoraPlan, plan_lora
from surgery.lora.report import LoraLoadReport
from surgery.lora.transaction import ModuleSnapshot
from surgery.weights.keys import KeyMap


def _exact(names: Sequence[str]) -> str:
    return "|".join(re.escape(n) for n in names)


def _check_module(module: object, adapter_name: str) -> None:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    if not isinstance(module, nn.Module):
        raise WeightsError(f"load_lora_file needs a torch.nn.Module, got {type(module).__name__}",
                           "pass the (rewritten) model to load the LoRA into")
    if isinstance(module, (PeftModel, BaseTuner)):
        raise WeightsError(
            f"load_lora_file got a {type(module).__name__}; it injects into a plain module in place",
            "pass the underlying module (peft_model.get_base_model())",
        )
    used = sorted(n for n, m in module.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A)
    if used:
        raise WeightsError(
            f"adapter {adapter_name!r} is already loaded (e.g. on {used[0]!r})",
            "pass a different adapter_name for each LoRA file",
        )


def rule_schemes(module: nn.Module) -> tuple[TargetScheme, ...]:
    """The LoRA naming schemes of the rules that rewrote ``module`` (a PEFT wrapper looked through)."""
    for inner in module.modules():
        state = inner.__dict__.get("_surgery")
        if state is not None:
            return tuple(scheme for rule in state.rules if rule.lora_schemes is not None
                         for scheme in rule.lora_schemes(inner))
    return ()


def load_lora_file(
    module: nn.Module,
    path: str | Path,
    *,
    adapter_name: str = "default",
    scale: float = 1.0,
    schemes: Sequence[TargetScheme] | None = None,
    key_map: KeyMap | None = None,
    strip_prefixes: Sequence[str] = DEFAULT_LORA_PREFIXES,
) -> LoraLoadReport:
    """Inject the LoRA stored at ``path`` into ``module`` (in place) as adapter ``adapter_name``.

    Accepted key schemes: ``<target>.lora_A/lora_B.weight`` (optionally with the adapter
    name inside, ``lora_A.default.weight``), ``lora_down/lora_up``, optional ``.alpha``,
    with or without a ``diffusion_model.``/``model.diffusion_model.``/``base_model.model.``/
    ``transformer.`` prefix; targets at the model's module paths; and the naming schemes of
    the rule that rewrote ``module`` (``Rule.lora_schemes``, e.g. VACE's ``blocks.N.vace.*``),
    or ``schemes`` when given. ``key_map`` renames other layouts (one of the rule's
    ``key_maps``, e.g. ``rules.vace.DIFFUSERS_TO_NATIVE``).

    Returns a report whose ``model`` is ``module`` itself (PEFT layers injected in place,
    not a ``PeftModel``). The new adapter is made active next to any adapters already
    active on the same layers. ``requires_grad`` of the existing parameters is left as it
    was (PEFT would otherwise freeze everything but the adapter).

    All or nothing: every argument and every pair of the file (keys, targets, shapes,
    rank, NaN/Inf, and range in the adapter's dtype) is checked before PEFT is called, and
    an injection that fails or is interrupted half-way is undone, so on any error the
    module is exactly as it was and the call can be retried.

    Raises:
        WeightsError: a bad argument (``scale`` not a finite real number, a bad
            ``adapter_name`` or ``strip_prefixes``, or a scheme's own check), an unreadable/unsafe
            file, unknown keys, missing or non-Linear targets, rank 0, rank/shape mismatch,
            NaN/Inf, values that overflow the model's dtype, or an adapter name already in use.
    """
    start = time.perf_counter()
    adapter_name = check_adapter_name(adapter_name)
    scale = check_scale(scale)
    path = check_path(path)
    strip_prefixes = check_strip_prefixes(strip_prefixes)
    _check_module(module, adapter_name)
    schemes = rule_schemes(module) if schemes is None else tuple(schemes)
    plan = plan_lora(module, str(path), scale=scale, schemes=schemes, key_map=key_map,
                     strip_prefixes=strip_prefixes)

    snapshot = ModuleSnapshot(module)
    try:
        dtypes = _inject(module, plan, adapter_name, scale)
    except BaseException:
        snapshot.restore()
        raise
    return LoraLoadReport(
        model=module,
        adapter_name=adapter_name,
        files=plan.files,
        schemes=plan.schemes,
        targets=tuple(plan.targets),
        ranks=dict(Counter(plan.ranks.values())),
        with_alpha=sum("alpha" in v for v in plan.values.values()),
        scale=scale,
        tensors=sum(len(v) for v in plan.values.values()),
        lora_dtypes=dict(dtypes),
        seconds=time.perf_counter() - start,
    )


def _inject(module: nn.Module, plan: LoraPlan, adapter_name: str, scale: float) -> Counter[str]:
    """Inject and fill the adapter; may leave ``module`` half-changed when it raises (the caller undoes)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    targets = plan.targets
    rank0 = Counter(plan.ranks.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=rank0,
        lora_alpha=rank0,
        target_modules=_exact(targets),
        rank_pattern={re.escape(t): r for t, r in plan.ranks.items() if r != rank0},
        alpha_pattern={re.escape(t): a for t, a in plan.alphas.items() if a != rank0},
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
    wrong_rank = [t for t in targets if t in injected and injected[t].r[adapter_name] != plan.ranks[t]]
    if set(injected) != set(targets) or wrong_rank:
        raise WeightsError(
            f"PEFT injected adapter {adapter_name!r} into {len(injected)} modules instead of the {len(targets)} "
            f"named in the file{f', with the wrong rank on {wrong_rank[0]!r}' if wrong_rank else ''}",
            "report this as a bug together with the peft version",
        )
    dtypes: Counter[str] = Counter()
    with torch.no_grad():
        for target in targets:
            layer = injected[target]
            for role, holder in (("A", layer.lora_A), ("B", layer.lora_B)):
                weight = holder[adapter_name].weight
                weight.copy_(plan.values[target][role])
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
    return dtypes
