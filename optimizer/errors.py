"""Errors that end a run before any variant is measured; each says what failed and what to do.

`reason` is the machine-readable cause the worker reports to the operator (status.reason).
"""


class OptimizationError(RuntimeError):
    reason = "OptimizationFailed"


class ModelLoadError(OptimizationError):
    """The model cannot be loaded."""

    reason = "ModelLoadFailed"


class DataLoadError(OptimizationError, ValueError):
    """The data source cannot be used; the message names data.source and the fix."""

    reason = "DataLoadFailed"


class DeviceError(OptimizationError):
    """The requested device is not usable here."""

    reason = "DeviceUnavailable"
