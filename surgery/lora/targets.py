"""Target selection for the built-in ("module targeted") LoRA strategy.

Upstream selects every ``nn.Linear`` inside modules whose *class name* is one of the
main attention-block classes, which skips grafted blocks (e.g. VACE's) only because their
class has another name. Here the same set is found structurally: the children of the
``blocks`` ``ModuleList`` are the main attention blocks; a grafted list has another name,
and a ``blocks`` list inside the modules a rule grafted (its ``weight_prefixes``) is not the
model's own.
(In an fx ``GraphModule`` the same path is a plain container of ``"0"``, ``"1"``, ...;
it is accepted too.)
"""
from __future__ import annotations

from torch import nn

from surgery.errors import MatchError
from surgery.lora.order import peft_imported
from surgery.weights.keys import under_prefixes

BLOCKS_NAME = "blocks"


def _grafted_prefixes(module: nn.Module) -> tuple[str, ...]:
    """The state_dict prefixes of the modules grafted by the rule that rewrote ``module`` (none for a base model)."""
    rule = getattr(module.__dict__.get("_surgery"), "rule", None)
    return tuple(getattr(rule, "weight_prefixes", None) or ())


def _is_block_list(name: str, child: nn.Module, grafted: tuple[str, ...] = ()) -> bool:
    """A container named ``blocks`` whose children are indexed ``0..n-1``, outside the ``grafted`` modules.

    Usually an ``nn.ModuleList``; after ``torch.fx`` tracing the same path is a plain
    ``nn.Module`` holding ``"0"``, ``"1"``, ... so the structure, not the type, decides.
    """
    if name.split(".")[-1] != BLOCKS_NAME or under_prefixes(f"{name}.", grafted):
        return False
    names = [n for n, _ in child.named_children()]
    return bool(names) and sorted(names, key=lambda n: (len(n), n)) == [str(i) for i in range(len(names))]


def _main_block_lists(module: nn.Module) -> list[tuple[str, nn.Module]]:
    grafted = _grafted_prefixes(module)
    found = [(n, c) for n, c in module.named_modules() if _is_block_list(n, c, grafted)]  # aliases de-duplicated
    # A nested "blocks" list inside a main block would be found again under it; keep the outermost.
    return [(n, c) for n, c in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]


def _is_tuner_layer(module: nn.Module) -> bool:
    if not peft_imported():
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def module_targeted_targets(module: nn.Module) -> list[str]:
    """Every ``nn.Linear`` inside the main attention blocks ``blocks.N``; none in grafted modules
    (the rule's ``weight_prefixes``, also those grafted inside a block).

    Returns fully qualified module names in module order, e.g. ``blocks.0.self_attn.q`` ...
    ``blocks.0.ffn.2``, suitable as exact PEFT targets.

    Raises:
        MatchError: the module has no ``blocks`` ModuleList, or its blocks hold no Linear.
    """
    lists = _main_block_lists(module)
    if not lists:
        raise MatchError(
            f"{type(module).__name__} has no 'blocks' list (children 0..n-1), so the main attention blocks "
            "cannot be found",
            "pass the transformer whose main blocks live in a ModuleList named 'blocks'",
        )
    grafted = _grafted_prefixes(module)
    targets: list[str] = []
    for list_name, blocks in lists:
        for index, block in blocks.named_children():
            prefix = f"{list_name}.{index}"
            skip: list[str] = []
            for sub_name, sub in block.named_modules():
                # A rule's module grafted inside a block (blocks.*.ffn_adapter.) is not the base model's.
                if under_prefixes(f"{prefix}.{sub_name}.", grafted):
                    continue
                # A LoRA-wrapped Linear is still the target (PEFT adds adapters to it); its inner
                # .base_layer and lora_A/lora_B Linears are not.
                if any(sub_name.startswith(s + ".") for s in skip):
                    continue
                wrapped = _is_tuner_layer(sub)
                if wrapped:
                    skip.append(sub_name)
                if isinstance(sub.get_base_layer() if wrapped else sub, nn.Linear):
                    targets.append(f"{prefix}.{sub_name}" if sub_name else prefix)
    if not targets:
        raise MatchError(
            f"the 'blocks' of {type(module).__name__} contain no nn.Linear layers",
            "the model's attention projections must be nn.Linear modules (not fused or quantised) for LoRA",
        )
    return targets
