"""surgery: rule-based model surgery on torch.fx graphs.

>>> import surgery
>>> from rules import vace
>>> result = surgery.apply(model, vace.rule(), example_inputs=(args, kwargs))   # doctest: +SKIP
>>> out = result.module(*args, **kwargs, vace_context=ctx, vace_context_scale=1.0)  # doctest: +SKIP
"""
from .api import ApplyResult, Grafted, apply, check_order
from .errors import SurgeryError
from .matching.matcher import Match
from .rule import Rule, Site, Where
from .tracing.guards import Guard
from .tracing.policy import TracePolicy

__all__ = ["ApplyResult", "Grafted", "Guard", "Match", "Rule", "Site", "SurgeryError", "TracePolicy", "Where",
           "apply", "check_order"]
