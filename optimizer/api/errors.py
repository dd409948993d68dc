"""Errors that end a run before any variant is measured; each says what failed and what to do.

`reason` is the machine-readable cause the worker reports to the operator (status.reason).
"""


class OptimizationError(RuntimeError):
    reason = "OptimizationFailed"
    exit_code = 1


class ModelLoadError(OptimizationError):
    """The model cannot be loaded."""

    reason = "ModelLoadFailed"


class DataLoadError(OptimizationError, ValueError):
    """The data source cannot be used; the message names data.source and the fix."""

    reason = "DataLoadFailed"


class DeviceError(OptimizationError):
    """The requested device is not usable here."""

    reason = "DeviceUnavailable"


class InputMismatchError(OptimizationError):
    """spec.model.inputs does not fit the model; the message names the field and the fix.

    A spec problem found by looking at the model, so it exits 2 like any other invalid spec."""

    reason = "InvalidSpec"
    exit_code = 2


class RecipeFailure(RuntimeError):
    """A recipe cannot build its variant for a reason the user can act on (the message says how).

    Anything else a recipe raises is an mlopt bug and is reported as one (see internal_error)."""


def internal_error(error: BaseException) -> str:
    """One line for an exception nobody anticipated: its class, where it was raised and the mlopt
    frame that called into it, so a bug report needs no traceback (`--debug` prints the full one)."""
    import traceback
    from pathlib import Path

    frames = traceback.extract_tb(error.__traceback__)
    package = Path(__file__).parents[1]  # optimizer/

    def place(frame) -> str:
        path = Path(frame.filename)
        libraries = [p for p in path.parents if p.name in ("site-packages", "dist-packages")]
        for root in (*libraries, package.parent):
            if path.is_relative_to(root):
                path = path.relative_to(root)
                break
        return f"{path}:{frame.lineno} in {frame.name}"

    ours = [f for f in frames if Path(f.filename).is_relative_to(package)]
    where = place(frames[-1]) if frames else "an unknown place"
    if ours and ours[-1] is not frames[-1]:
        where += f", called from {place(ours[-1])}"
    message = " ".join(str(error).split())[:300]
    return (f"internal error (an mlopt bug, please report it): {type(error).__name__} at {where}: {message}")
