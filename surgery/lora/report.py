"""What a LoRA file load did."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class LoraLoadReport:
    """Summary of one :func:`surgery.lora.load_lora_file` call.

    ``model`` is the very module that was passed in, now carrying PEFT LoRA layers in
    place (not a ``PeftModel`` wrapper); ``targets`` are the module names that received
    the adapter.
    """

    model: nn.Module = field(repr=False)
    adapter_name: str
    files: tuple[str, ...]
    schemes: tuple[str, ...]
    targets: tuple[str, ...]
    ranks: dict[int, int]
    with_alpha: int
    scale: float
    tensors: int
    lora_dtypes: dict[str, int]
    seconds: float

    @property
    def main_targets(self) -> int:
        return sum(t.startswith("blocks.") for t in self.targets)

    @property
    def vace_targets(self) -> int:
        return sum(t.startswith("vace_blocks.") for t in self.targets)

    def as_rows(self) -> list[tuple[str, str]]:
        """``(field, value)`` rows for a two-column ``rich.table.Table``."""
        other = len(self.targets) - self.main_targets - self.vace_targets
        return [
            ("adapter", self.adapter_name),
            ("files", "\n".join(self.files)),
            ("key schemes", ", ".join(self.schemes)),
            ("targets", f"{len(self.targets)} (blocks: {self.main_targets}, vace_blocks: {self.vace_targets}, "
                        f"other: {other})"),
            ("ranks", ", ".join(f"r={r}: {n}" for r, n in sorted(self.ranks.items()))),
            ("targets with alpha", str(self.with_alpha)),
            ("scale", f"{self.scale:g}"),
            ("tensors", str(self.tensors)),
            ("adapter dtypes", ", ".join(f"{k}: {v}" for k, v in sorted(self.lora_dtypes.items()))),
            ("seconds", f"{self.seconds:.3f}"),
        ]
