"""What a weights load did, for logs, reports and the CLI table."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


#: The row that counts the stored tensors a load left alone (those of other modules).
IGNORED_LABEL = "tensors ignored (other modules')"


@dataclass(frozen=True)
class LoadReport:
    """Summary of one :func:`surgery.weights.load_weights` call (or :func:`~surgery.weights.load_rule_weights`).

    ``file_dtypes`` counts tensors by their dtype in the checkpoint, ``target_dtypes`` by
    the dtype they have in the model; ``shared`` counts tensors that now live directly in
    the checkpoint's memory map (``mmap=True`` only: no copy), ``converted`` those that
    needed a dtype or device conversion, ``copied`` those copied as stored (the default);
    ``ignored`` counts stored tensors outside the loaded prefixes, and ``facts`` holds what
    the rule's own checks read from the file (``WeightChecks.fit``: label -> value).
    """

    files: tuple[str, ...]
    tensors: int
    file_dtypes: dict[str, int]
    target_dtypes: dict[str, int]
    bytes_read: int
    seconds: float
    facts: dict[str, Any] = field(default_factory=dict)
    ignored: int = 0
    shared: int = 0
    converted: int = 0
    copied: int = 0
    key_map_rules: int = 0
    devices: dict[str, int] = field(default_factory=dict)

    def as_rows(self) -> list[tuple[str, str]]:
        """``(field, value)`` rows for a two-column ``rich.table.Table``."""

        def counts(d: dict[str, int]) -> str:
            return ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) or "-"

        return [
            ("files", "\n".join(self.files)),
            ("tensors loaded", str(self.tensors)),
            (IGNORED_LABEL, str(self.ignored)),
            ("file dtypes", counts(self.file_dtypes)),
            ("model dtypes", counts(self.target_dtypes)),
            ("devices", counts(self.devices)),
            ("shared with file (no copy)", str(self.shared)),
            ("converted", str(self.converted)),
            ("copied", str(self.copied)),
            ("bytes read", f"{self.bytes_read:,} ({self.bytes_read / 2**20:.1f} MiB)"),
            ("seconds", f"{self.seconds:.3f}"),
            *((label, str(value)) for label, value in self.facts.items()),
            ("key map rules", str(self.key_map_rules)),
        ]

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)
