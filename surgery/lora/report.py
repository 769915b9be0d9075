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
    def groups(self) -> dict[str, int]:
        """Targets per numbered module list (e.g. ``{"blocks": 3, "vace_blocks": 3}``), in first-seen order;
        targets outside one count under ``"other"``."""
        counts: dict[str, int] = {}
        for target in self.targets:
            parts = target.split(".")
            group = ".".join(parts[:next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))])
            key = group if group != target else "other"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def as_rows(self) -> list[tuple[str, str]]:
        """``(field, value)`` rows for a two-column ``rich.table.Table``."""
        return [
            ("adapter", self.adapter_name),
            ("files", "\n".join(self.files)),
            ("key schemes", ", ".join(self.schemes)),
            ("targets", f"{len(self.targets)} ({', '.join(f'{k}: {n}' for k, n in self.groups.items())})"),
            ("ranks", ", ".join(f"r={r}: {n}" for r, n in sorted(self.ranks.items()))),
            ("targets with alpha", str(self.with_alpha)),
            ("scale", f"{self.scale:g}"),
            ("tensors", str(self.tensors)),
            ("adapter dtypes", ", ".join(f"{k}: {v}" for k, v in sorted(self.lora_dtypes.items()))),
            ("seconds", f"{self.seconds:.3f}"),
        ]
