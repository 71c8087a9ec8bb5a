"""Every error sparsecc raises on purpose is a `SparseccError`: callers catch one type, messages name the
layer and the fix."""

from __future__ import annotations


class SparseccError(Exception):
    """Base class of every error sparsecc raises on purpose."""


class MaskError(SparseccError):
    """A mask that does not fit its weight: wrong shape, values other than 0/1, unknown layer."""


class WeightError(SparseccError):
    """A weight sparsecc refuses to compile, e.g. one holding NaN or Inf."""


class PassError(SparseccError):
    """A rewrite pass broke the graph; the message names the pass."""


class InputError(SparseccError):
    """A call-time input of the wrong shape, dtype or layout for what was compiled."""


class EquivalenceError(SparseccError):
    """The compiled model's outputs differ from the user's model (or a layer from its masked dense op) beyond
    tolerance."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class RuntimeUnavailableError(SparseccError):
    """A requested runtime cannot run here (missing package or device)."""


class SparseccWarning(UserWarning):
    """Something sparsecc worked around (train mode, tied weights) and reports."""


class ExportError(SparseccError):
    """A model that cannot be exported as asked (unsupported ops, unwritable path); says what to change."""


class VersionError(SparseccError):
    """A saved file from an incompatible sparsecc (or not from sparsecc at all)."""
