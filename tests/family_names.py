"""Which lines of a rule package name a model family (a generic rule must name none)."""
from __future__ import annotations

import re
from pathlib import Path

FAMILIES = re.compile(r"vace|CausalWan|\bwan\b|longlive|krea|memflow|streamdiffusion|reward.?forcing|kv_cache|"
                      r"crossattn|num_layers", re.IGNORECASE)


def family_names_in(package_file: str) -> list[str]:
    """``file:line`` of every line in the package of ``package_file`` that names a model family."""
    folder = Path(package_file).parent
    return [f"{path.name}:{i}" for path in sorted(folder.glob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if FAMILIES.search(line)]
