"""The export step: PyTorch -> ONNX, checked, shape-inferred, and proven equal to PyTorch.

The dynamo exporter is tried first; it is known to bake export-time lengths into some graphs
(bidirectional LSTM/GRU, pytorch#191855), so the parity check runs at a second shape along every
declared dynamic axis and, with `exporter: auto`, a failure falls back to the legacy exporter.

Models with recurrent layers go the other way round under `auto`: torch.export traces an LSTM by
unrolling it on fake tensors with symbolic lengths, which took 45-60 s for the CRNN on one core
against 0.5 s for the legacy exporter, with the same parity and the same INT8 speed after
quantization. The legacy exporter is deprecated in torch 2.13, which mlopt pins; dynamo stays the
fallback, and the results say which one ran and why.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optimizer.api.errors import ModelLoadError
from optimizer.api.spec import ExportSpec, InputSpec, Tolerance
from optimizer.engines.feeds import random_feed
from optimizer.engines.torch_export import dynamic_example, root_cause
from optimizer.steps.run import Run


class ParityError(AssertionError):
    """Outputs differ beyond tolerance; the message names the output, shape, max |Δ| and index."""


class ExportError(RuntimeError):
    """No export route produced a model that runs and matches PyTorch; the message has the details."""

    def __init__(self, message: str, attempts: list[dict]):
        super().__init__(message)
        self.attempts = attempts


@dataclass
class ExportResult:
    path: Path
    exporter: str
    output_names: list[str]
    checked_shapes: list[dict[str, list[int]]]
    notes: list[str] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)  # [{route, ok, reason}] in the order tried


# The ways from a PyTorch module to ONNX, as results.json names them.
ROUTES = {
    "dynamo": "the dynamo exporter",
    "legacy": "the legacy exporter",
    "torchscript-converter": "the TorchScript converter route (TS2EPConverter, then the dynamo exporter)",
}


def parity_shapes(inputs: list[InputSpec]) -> list[dict[str, list[int]]]:
    """The declared shapes, plus one with every dynamic axis doubled (batch 1 -> 2)."""
    declared = {spec.name: list(spec.shape) for spec in inputs}
    if not any(spec.dynamicAxes for spec in inputs):
        return [declared]
    second = {
        spec.name: [size * 2 if axis in spec.dynamicAxes else size for axis, size in enumerate(spec.shape)]
        for spec in inputs
    }
    return [declared, second]


def compare_outputs(
    expected: list[np.ndarray],
    actual: list[np.ndarray],
    names: list[str],
    default: Tolerance,
    per_output: dict[str, Tolerance],
    where: str,
    scaled: tuple[int, ...] = (),
) -> float:
    """Raise ParityError on the first output outside tolerance; return the max |Δ| seen.

    Outputs at the `scaled` indices (a detector's boxes) take rtol relative to their largest value:
    a box edge near 0 is the difference of two large numbers (centre − half a large box)."""
    if len(expected) != len(actual):
        raise ParityError(f"{where}: PyTorch gives {len(expected)} outputs, ONNX {len(actual)}")
    worst = 0.0
    for index, (name, ref, got) in enumerate(zip(names, expected, actual)):
        if ref.shape != got.shape:
            raise ParityError(f"{where}: output {name!r} has shape {list(got.shape)}, PyTorch {list(ref.shape)}")
        tol = per_output.get(name, default)
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        diff = np.abs(ref64 - got64)
        scale = np.abs(ref64).max(initial=0.0) if index in scaled else np.abs(ref64)
        excess = diff - (tol.atol + tol.rtol * scale)
        worst = max(worst, float(diff.max(initial=0.0)))
        if excess.size and excess.max() > 0:
            index = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), excess.shape))
            raise ParityError(
                f"{where}: output {name!r} differs from PyTorch: max |Δ| = {diff.max():.3g} "
                f"at index {index} (PyTorch {ref64[index]:.6g}, ONNX {got64[index]:.6g}); "
                f"tolerance atol={tol.atol:g} + rtol={tol.rtol:g}·|ref|"
            )
    return worst


def check_parity(torch_runner, onnx_runner, inputs, spec: ExportSpec, samples: int = 3,
                 scaled: tuple[int, ...] = ()) -> list[dict]:
    """Compare PyTorch and ONNX on several seeded inputs at each parity shape."""
    shapes = parity_shapes(inputs)
    for shape_index, shapes_by_name in enumerate(shapes):
        for sample in range(samples if shape_index == 0 else 2):
            feed = random_feed(inputs, shapes_by_name, seed=1000 * shape_index + sample)
            where = "inputs " + ", ".join(f"{n}={s}" for n, s in shapes_by_name.items())
            try:
                actual = onnx_runner(feed)
            except Exception as error:  # ORT raises its own exception types per failure
                raise ParityError(f"{where}: ONNX Runtime failed: {str(error).splitlines()[0][:300]}") from None
            compare_outputs(
                torch_runner(feed), actual, onnx_runner.output_names, spec.tolerance, spec.outputTolerances, where,
                scaled)
    return shapes


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx prints pages of progress and deprecation text; keep the user's terminal readable."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export_once(module, inputs: list[InputSpec], path: Path, exporter: str, opset: int) -> None:
    import torch

    names = [spec.name for spec in inputs]
    with _quiet_exporter():
        if exporter == "torchscript-converter":
            from torch._export.converter import TS2EPConverter

            example = dynamic_example(inputs)
            program = TS2EPConverter(module, example).convert()
            torch.onnx.export(program, example, str(path), input_names=names, opset_version=opset, dynamo=True,
                              external_data=False)
        elif exporter == "dynamo":
            example = dynamic_example(inputs)
            dynamic = tuple({axis: torch.export.Dim.DYNAMIC for axis in spec.dynamicAxes} or None for spec in inputs)
            # Keep onnxscript's optimizer on (slow: over half the export time) - without its constant
            # folding the LSTM weights stay behind ops that the INT8 quantizers cannot see through.
            torch.onnx.export(
                module, example, str(path), input_names=names, opset_version=opset, dynamo=True,
                dynamic_shapes=dynamic if any(dynamic) else None, external_data=False,
            )
        else:
            example = tuple(torch.from_numpy(a) for a in random_feed(inputs).values())
            dynamic_axes = {spec.name: {a: n for a, n in spec.dynamicAxes.items()} for spec in inputs if spec.dynamicAxes}
            torch.onnx.export(
                module, example, str(path), input_names=names, opset_version=opset, dynamo=False,
                dynamic_axes=dynamic_axes or None,
            )




def _check_and_infer(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path))
    onnx.shape_inference.infer_shapes_path(str(path), str(path))


RECURRENT_LAYERS = ("LSTM", "GRU", "RNN")


def _layer_name(module) -> str | None:
    """A torch.nn layer's class name, also inside a TorchScript model (where it is `original_name`)."""
    import torch

    if isinstance(module, torch.jit.ScriptModule):
        return getattr(module, "original_name", None)
    return type(module).__name__ if type(module).__module__.startswith("torch.nn") else None


def exporter_order(module, exporter: str) -> tuple[list[str], str | None]:
    """The export routes to try, in order, and why when `auto` picks an unusual order."""
    import torch

    scripted = isinstance(module, torch.jit.ScriptModule)
    dynamo = "torchscript-converter" if scripted else "dynamo"  # torch.export cannot trace a ScriptModule
    if exporter != "auto":
        return [dynamo if exporter == "dynamo" else exporter], None
    recurrent = sorted({name for m in module.modules() if (name := _layer_name(m)) in RECURRENT_LAYERS})
    if not recurrent:
        return [dynamo, "legacy"], None
    return ["legacy", dynamo], (
        f"exported with the legacy (TorchScript) exporter first because the model has {'/'.join(recurrent)} "
        "layers: the dynamo exporter unrolls them symbolically and takes about a minute (0.5 s for the legacy "
        "one on the CRNN); the legacy exporter is deprecated in torch 2.13, which mlopt pins, and dynamo is the fallback"
    )


def export_onnx(torch_runner, inputs: list[InputSpec], spec: ExportSpec, workdir: Path, threads: int = 1,
                scaled: tuple[int, ...] = (), log=None) -> ExportResult:
    """Export with the configured exporter(s); return the first model that passes the parity check.
    `scaled`: outputs compared at their own scale (compare_outputs); `log` reports each route's progress."""
    import time

    from optimizer.engines.runners import OrtRunner

    order, why = exporter_order(torch_runner.module, spec.exporter)
    failures: list[str] = []
    attempts: list[dict] = []
    for exporter in order:
        path = workdir / f"exported-{exporter}.onnx"
        started = time.perf_counter()
        if log:
            log(f"exporting with {ROUTES[exporter]} …")
        try:
            _export_once(torch_runner.module, inputs, path, exporter, spec.opset)
            _check_and_infer(path)
            if log:
                log(f"exported in {time.perf_counter() - started:.1f} s ({path.stat().st_size / 1e6:.1f} MB); "
                    "checking parity with PyTorch …")
            onnx_runner = OrtRunner(path, threads=threads)
            shapes = check_parity(torch_runner, onnx_runner, inputs, spec, scaled=scaled)
        except ParityError as error:
            reason = f"{ROUTES[exporter]} gave a model that differs from PyTorch: {error}"
        except Exception as error:
            reason = f"{ROUTES[exporter]} failed: {root_cause(error)}{_hint(error, exporter, inputs)}"
        else:
            attempts.append({"route": exporter, "ok": True, "reason": f"{ROUTES[exporter]} passed the parity check"})
            notes = [why] if why and exporter == order[0] else []
            if failures:
                notes.append(f"exported with {ROUTES[exporter]} because " + "; ".join(failures))
            return ExportResult(path, exporter, onnx_runner.output_names, shapes, notes, attempts)
        failures.append(reason)
        attempts.append({"route": exporter, "ok": False, "reason": reason})
    raise ExportError(" | ".join(failures), attempts)


# Exporter complaints that have a known fix the user can apply.
_HINTS = {
    "_transformer_encoder_layer_fwd": "the TorchScript model was traced under torch.no_grad()/inference_mode, which "
    "records PyTorch's fused transformer kernel (no ONNX equivalent); trace it with gradients enabled, or give "
    "the state_dict with model.entrypoint",
    "Exporting a ScriptModule is not supported": "give the model as a state_dict with model.entrypoint or as a "
    "torch.export .pt2 file",
}


def _hint(error: BaseException, route: str, inputs: list[InputSpec]) -> str:
    """A known fix for this failure, as " (…)", or ""; the markers may sit anywhere in the cause chain."""
    texts = []
    while error is not None:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    text = "\n".join(texts)
    for marker, hint in _HINTS.items():
        if marker in text:
            return f" ({hint})"
    if route == "torchscript-converter" and any(spec.dynamicAxes for spec in inputs):
        return (" (a TorchScript trace records sizes as tensors, so the converter cannot keep an axis dynamic: "
                "declare no dynamicAxes to optimize at the declared shape, or give a state_dict with "
                "model.entrypoint or a .pt2 exported with a dynamic Dim)")
    return ""


def onnx_source_runner(path: Path, threads: int, device: str):
    """The user's ONNX model in ONNX Runtime. onnx's checker passes graphs this ONNX Runtime still
    cannot run (an opset or IR version newer than it knows, an op it lacks): say so as a load error."""
    import onnxruntime as ort

    from optimizer.engines.runners import OrtRunner, ProviderError

    try:
        return OrtRunner(path, threads=threads, device=device)
    except ProviderError:
        raise
    except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        detail = " ".join(str(error).split())[:400]
        raise ModelLoadError(f"model.source: ONNX Runtime {ort.__version__} cannot load this model: {detail}; "
                             "export it at an opset this version supports (or use a newer onnxruntime)") from None


def _static_retry(module, inputs: list[InputSpec]) -> list[InputSpec] | None:
    """A TorchScript trace with declared dynamicAxes: the inputs at the declared shape only, to export again
    when no route kept the axes dynamic (a trace records sizes as it saw them, so the converter cannot make
    an axis dynamic and the legacy export fails the parity check at the second shape); None otherwise."""
    import torch

    if not isinstance(module, torch.jit.ScriptModule) or not any(spec.dynamicAxes for spec in inputs):
        return None
    return [spec.model_copy(update={"dynamicAxes": {}}) for spec in inputs]


def _static_note(inputs: list[InputSpec]) -> str:
    axes = "; ".join(f"{spec.name} {dict(spec.dynamicAxes)}" for spec in inputs if spec.dynamicAxes)
    shapes = ", ".join(f"{spec.name}={list(spec.shape)}" for spec in inputs)
    return (f"the TorchScript trace could not be exported with the declared dynamicAxes ({axes}), so it was exported, "
            f"verified and timed at the declared shape only ({shapes}): the ONNX variants accept that shape alone. "
            "To keep the axes dynamic, give the state_dict with model.entrypoint or a .pt2 exported with a dynamic Dim")


def export_step(run: Run) -> None:
    """The PyTorch baseline's runner, and its ONNX export checked for parity (an ONNX source is its own baseline)."""
    from optimizer.engines.runners import TorchRunner

    threads = run.spec.spec.benchmark.threads
    if run.loaded.onnx_path is not None:
        run.baseline_runner = onnx_source_runner(run.loaded.onnx_path, threads, run.spec.spec.benchmark.device)
        return
    names = [spec.name for spec in run.loaded.inputs]
    run.baseline_runner = TorchRunner(run.loaded.module, names, device=run.spec.spec.benchmark.device)
    cpu_reference = TorchRunner(run.loaded.module, names)
    detection = run.loaded.detection

    def export(inputs: list[InputSpec]) -> ExportResult:
        return export_onnx(cpu_reference, inputs, run.spec.spec.export, run.scratch, threads,
                           scaled=(detection.boxesOutput,) if detection else (), log=run.reporter.log)

    try:
        try:
            run.export = export(run.loaded.inputs)
        except ExportError as error:
            static = _static_retry(run.loaded.module, run.loaded.inputs)
            if static is None:
                raise
            run.reporter.log(f"ONNX export with dynamic axes failed ({error}); exporting at the declared shape …")
            try:
                run.export = export(static)
            except ExportError as second:
                raise ExportError(f"{error} | at the declared shape: {second}", error.attempts + second.attempts) from None
            note = _static_note(run.loaded.inputs)
            run.export.attempts = error.attempts + run.export.attempts
            run.export.notes.append(note)
            run.input_notes.append(note)
            run.loaded.inputs = static  # every later step (variants, benchmark, scaling) sees the shape that was exported
        run.export_attempts = run.export.attempts
        run.reporter.log(f"exported with {ROUTES[run.export.exporter]}; parity checked at "
                         + " and ".join(str(s) for s in run.export.checked_shapes))
    except ExportError as error:
        run.export_error, run.export_attempts = str(error), error.attempts
        run.reporter.log(f"ONNX export failed: {error}")
    if run.spec.spec.benchmark.device == "cuda":
        run.loaded.module.to("cuda")
