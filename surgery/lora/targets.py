"""Target selection for the built-in ("module targeted") LoRA strategy.

Upstream selects every ``nn.Linear`` inside modules whose *class name* is one of the
main attention-block classes, which skips the VACE blocks only because their class has
another name. Here the same set is found structurally: the children of the ``blocks``
``ModuleList`` are the main attention blocks, and ``vace_blocks`` is a different list.
"""
from __future__ import annotations

from torch import nn

from surgery.errors import MatchError

BLOCKS_NAME = "blocks"


def _main_block_lists(module: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    found = []
    for name, child in module.named_modules():  # de-duplicates aliases: first name wins
        parts = name.split(".")
        if (
            isinstance(child, nn.ModuleList)
            and parts[-1] == BLOCKS_NAME
            and not any(p.startswith("vace_") for p in parts)
        ):
            found.append((name, child))
    # A nested "blocks" list inside a main block would be found again under it; keep the outermost.
    return [(n, c) for n, c in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]


def module_targeted_targets(module: nn.Module) -> list[str]:
    """Every ``nn.Linear`` inside the main attention blocks ``blocks.N``; none in ``vace_blocks``.

    Returns fully qualified module names in module order, e.g. ``blocks.0.self_attn.q`` ...
    ``blocks.0.ffn.2``, suitable as exact PEFT targets.

    Raises:
        MatchError: the module has no ``blocks`` ModuleList, or its blocks hold no Linear.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    lists = _main_block_lists(module)
    if not lists:
        raise MatchError(
            f"{type(module).__name__} has no 'blocks' ModuleList, so the main attention blocks cannot be found",
            "pass the transformer whose main blocks live in a ModuleList named 'blocks'",
        )
    targets: list[str] = []
    for list_name, blocks in lists:
        for index, block in enumerate(blocks):
            prefix = f"{list_name}.{index}"
            skip: list[str] = []
            for sub_name, sub in block.named_modules():
                # A LoRA-wrapped Linear is still the target (PEFT adds adapters to it); its inner
                # .base_layer and lora_A/lora_B Linears are not.
                if any(sub_name.startswith(s + ".") for s in skip):
                    continue
                wrapped = isinstance(sub, BaseTunerLayer)
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
