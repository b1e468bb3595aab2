"""The one error hierarchy of cachefit.

The library raises these; only the CLI maps them to exit codes (2: bad input, 3: no feasible plan)
and prints a traceback only with ``--debug``. A message says what failed, with numbers and units,
and what to change.
"""

from __future__ import annotations

from typing import Any


class CachefitError(Exception):
    """Base of every error cachefit raises on purpose."""

    exit_code: int = 1


class ConfigError(CachefitError):
    """Bad user input: a malformed size, a missing config field, a contradictory setting."""

    exit_code = 2


class ProfileError(CachefitError):
    """A model could not be profiled (unknown family, unsupported layer, inconsistent shapes)."""

    exit_code = 2


class UnsupportedCompressionError(CachefitError):
    """A compression technique cannot be applied to a unit (or on the given target)."""

    exit_code = 2


class InfeasiblePlanError(CachefitError):
    """Valid input, but no plan meets the constraints; ``report`` lists what cannot be met."""

    exit_code = 3

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class DeployError(CachefitError):
    """A plan could not be deployed or a deployed run failed."""

    exit_code = 1
