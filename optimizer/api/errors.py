"""Errors that end a run before any variant is measured; each says what failed and what to do.

`reason` is the machine-readable cause the worker reports to the operator (status.reason).
"""


class OptimizationError(RuntimeError):
    reason = "OptimizationFailed"
    exit_code = 1


class ModelLoadError(OptimizationError):
    """The model cannot be loaded."""

    reason = "ModelLoadFailed"


class ModelRefusedError(ModelLoadError):
    """model.source is a model mlopt will not load as it is (its own Python code, pickled weights, no
    model in the folder): the user changes the spec or the model, so it exits 2 like an invalid spec."""

    reason = "InvalidSpec"
    exit_code = 2


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


# The libraries mlopt drives. Their own exception classes, and a RuntimeError/ValueError raised inside
# them (torch and OpenVINO raise their C++ errors as RuntimeError), are their documented way to say
# "this model, file or object cannot be handled here": a reason the user can act on. By name, so
# this module imports none of them.
LIBRARIES = frozenset({"onnxruntime", "onnx", "onnxscript", "openvino", "nncf", "torch", "torchao", "obstore",
                       "safetensors", "google"})
# Library classes that mean the caller (mlopt) used the library wrongly.
CALLER_ERRORS = frozenset({"UnknownConfigurationKeyError"})


def _library(filename: str) -> str | None:
    """The top-level package a traceback frame's file belongs to, if it is an installed library."""
    from pathlib import PurePath

    parts = PurePath(filename).parts
    for index, part in enumerate(parts[:-1]):
        if part in ("site-packages", "dist-packages"):
            return parts[index + 1].removesuffix(".py")
    return None


def is_expected(error: BaseException) -> bool:
    """Whether `error` is a failure the user can act on (a reason), rather than an mlopt bug.

    Expected: mlopt's own OptimizationError and RecipeFailure; the machine (OSError: disk, network;
    MemoryError); a library's own exception class; a built-in RuntimeError, ValueError or
    NotImplementedError raised inside a library. Anything else — a TypeError, KeyError,
    AttributeError, an AssertionError, a RuntimeError raised in mlopt's own code — is a bug."""
    import traceback

    if isinstance(error, (OptimizationError, RecipeFailure, OSError, MemoryError)):
        return True
    cls = type(error)
    if cls.__module__.split(".")[0] in LIBRARIES:
        return cls.__name__ not in CALLER_ERRORS
    if cls.__module__ == "builtins" and isinstance(error, (RuntimeError, ValueError, NotImplementedError)):
        frames = traceback.extract_tb(error.__traceback__)
        return bool(frames) and _library(frames[-1].filename) in LIBRARIES
    return False


def failure_reason(error: BaseException, what: str) -> str:
    """One line for a step's failure: `what: Class: message` when it is expected (is_expected), else
    internal_error's line, so an mlopt bug is never passed off as a property of the user's model."""
    if not is_expected(error):
        return internal_error(error)
    message = " ".join(str(error).split())[:300]
    return f"{what}: {type(error).__name__}: {message}"


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
