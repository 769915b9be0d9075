"""User-facing errors.

Every error that can reach a user is a :class:`SurgeryError`: one line that names the
problem, then the fix. The CLI prints ``str(error)`` and exits with code 2; a traceback
appears only with ``--debug``.
"""
from __future__ import annotations


class SurgeryError(Exception):
    """Base class: ``problem`` says what is wrong, ``fix`` says what to do about it."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = " ".join(problem.split())
        self.fix = " ".join(fix.split())
        super().__init__(self.problem + (f"; fix: {self.fix}" if self.fix else ""))


class RuleError(SurgeryError, ValueError):
    """A rule was constructed with invalid options."""


class TraceError(SurgeryError):
    """The model could not be captured into an fx graph."""


class MatchError(SurgeryError):
    """A rule's pattern matched nothing, or not the expected number of times."""


class OrderError(SurgeryError):
    """Surgery was asked in the wrong order (Base -> rules -> LoRA, e.g. Base -> vace -> LoRA)."""


class GraftError(SurgeryError):
    """A grafted module could not be built for the matched structure."""


class WeightsError(SurgeryError):
    """A weights file is unreadable, unsafe, or does not fit the model."""


class CallError(SurgeryError, ValueError):
    """A call to a rewritten model got inputs that do not fit it."""


class ReportError(SurgeryError):
    """A report could not be written."""


class InputError(SurgeryError):
    """Bad command-line input (unknown model, unimportable factory, bad option)."""


class ArgumentError(SurgeryError, TypeError):
    """A surgery API function was called with malformed arguments (wrong type or value)."""


class SaveError(SurgeryError, TypeError):
    """A rewritten model cannot be pickled or copied (its rule cannot be rebuilt on load)."""
