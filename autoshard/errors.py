"""The errors autoshard raises on purpose; each is also a standard exception type
(``ValueError`` / ``RuntimeError``), so ``except ValueError`` keeps working."""
from __future__ import annotations


class InfeasiblePlanError(ValueError):
    """No plan fits ``memory_budget``; ``min_peak_bytes`` is the smallest peak one reaches."""

    def __init__(self, message: str, min_peak_bytes: float, memory_budget: float):
        super().__init__(message)
        self.min_peak_bytes = float(min_peak_bytes)
        self.memory_budget = float(memory_budget)


class PlanFormatError(ValueError):
    """A plan file that cannot be read: the message names the field and the problem."""


class PlanMismatchError(RuntimeError):
    """Processes of a ``jax.distributed`` run made different plans for the same call."""


class AgreementTimeoutError(RuntimeError):
    """Processes of a ``jax.distributed`` run did not all reach the check that they hold
    the same plan in time (one died, hung, or plans far slower than the others);
    ``missing`` holds their process indices."""

    def __init__(self, message: str, missing):
        super().__init__(message)
        self.missing = tuple(missing)
