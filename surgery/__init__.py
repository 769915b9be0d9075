"""surgery: rule-based model surgery on torch.fx graphs.

>>> import surgery
>>> from rules import vace
>>> result = surgery.apply(model, vace.rule(), example_inputs=(args, kwargs))   # doctest: +SKIP
>>> out = result.module(*args, **kwargs, vace_context=ctx, vace_context_scale=1.0)  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import SurgeryError

if TYPE_CHECKING:
    from .api import ApplyResult, Grafted, apply, check_order
    from .matching.matcher import Match
    from .rule import Rule, Site, Where
    from .tracing.guards import Guard
    from .tracing.policy import TracePolicy

# Imported on first use: the `surgery` command imports this package before it can catch a
# Ctrl-C, so the package itself must not spend seconds importing torch.
_EXPORTS = {
    "ApplyResult": ".api", "Grafted": ".api", "apply": ".api", "check_order": ".api",
    "Match": ".matching.matcher", "Rule": ".rule", "Site": ".rule", "Where": ".rule",
    "Guard": ".tracing.guards", "TracePolicy": ".tracing.policy",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


__all__ = ["ApplyResult", "Grafted", "Guard", "Match", "Rule", "Site", "SurgeryError", "TracePolicy", "Where",
           "apply", "check_order"]
