"""ONNX Runtime recipes: FP32, dynamic/static INT8 (QDQ), static+dynamic, and FP16 for GPU."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from optimizer.artifacts import onnx_files
from optimizer.engines import BuildContext, Built, NotApplicable
from optimizer.engines.runners import OrtRunner, op_counts
from optimizer.api.spec import VariantSpec

# Conv is deliberately absent: quantize_dynamic turns Conv into ConvInteger, which ORT's CPU
# provider runs slower than FP32 Conv (0.6x on the CRNN). Static QDQ is the way for convolutions.
DYNAMIC_DEFAULT_OPS = ["LSTM", "GRU", "MatMul", "Gemm", "Attention"]
RECURRENT_OPS = ["LSTM", "GRU"]


def _runner(ctx: BuildContext, name: str, path: Path) -> OrtRunner:
    runner = OrtRunner(path, threads=ctx.threads, device=ctx.device, optimized_path=ctx.workdir / f"{name}.ort-optimized.onnx")
    if ctx.device == "cuda":  # a variant whose compute ops fall back to the CPU fails here, untimed
        runner.verify_placement(ctx.dataset.calibration[0])
    return runner


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs every skipped node with bare logging.info/warning, i.e. through the
    root logger itself: for the quantize call only, a filter on the root logger drops its records below
    ERROR (other loggers' records never pass a logger's filters), and no logger's level changes."""
    import onnxruntime.quantization

    package = str(Path(onnxruntime.quantization.__file__).parent) + os.sep

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(package)

    root = logging.getLogger()
    # Bare logging.info() configures a stderr handler on a root logger without handlers; a NullHandler
    # for the call keeps it from doing so (a run collects through its own handler: run_log.py).
    guard = logging.NullHandler() if not root.handlers else None
    root.addFilter(keep)
    if guard:
        root.addHandler(guard)
    try:
        yield
    finally:
        root.removeFilter(keep)
        if guard:
            root.removeHandler(guard)


def ort_source(ctx: BuildContext) -> Path:
    """The FP32 model ONNX Runtime's recipes start from: the verified export, with Mish in a form
    ORT runs fast (optimizer/engines/mish.py) when the model has any."""
    if "ort_source" not in ctx.cache:
        from optimizer.engines import mish

        source, target = ctx.require_onnx(), ctx.workdir / "mish-rewritten.onnx"
        count = mish.rewrite(source, target, ctx.external_data, onnx_files.data_location(target))
        ctx.cache["ort_source"] = target if count else source
        ctx.cache["mish_note"] = (
            f"{count} Mish activation(s) run as x·n/(n+2), n = eˣ(eˣ+2) (Exp, Add, Mul, Div: vectorized in ONNX "
            "Runtime) instead of Softplus/Tanh/Mul, whose scalar Softplus took 38% of YOLOv4's FP32 time; "
            "the same function within 2e-6") if count else None
    return ctx.cache["ort_source"]


def _mish_notes(ctx: BuildContext) -> list[str]:
    ort_source(ctx)
    return [ctx.cache["mish_note"]] if ctx.cache.get("mish_note") else []


def preprocessed(ctx: BuildContext) -> Path:
    """Run quant_pre_process once: without it the quantizer silently skips the dynamo export's
    LSTM weights (they sit behind Slice/Concat) and leaves the LSTMs in FP32."""
    if "preprocessed" not in ctx.cache:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        source, target = ort_source(ctx), ctx.workdir / "preprocessed.onnx"
        external = dict(save_as_external_data=ctx.external_data, all_tensors_to_one_file=True,
                        external_data_location=onnx_files.data_location(target))
        # Its symbolic shape inference writes temporary files (a 257 MB weights file for YOLOv4) into the
        # working directory and leaves them there: run it inside the run's scratch folder.
        with contextlib.chdir(ctx.workdir):
            try:
                quant_pre_process(str(source.resolve()), str(target.resolve()), **external)
            except Exception:  # symbolic shape inference gives up on some graphs; ONNX's own still helps
                quant_pre_process(str(source.resolve()), str(target.resolve()), skip_symbolic_shape=True, **external)
        ctx.cache["preprocessed"] = target
    return ctx.cache["preprocessed"]


class _Calibration:
    """ORT's CalibrationDataReader protocol over the data set's calibration items."""

    def __init__(self, items, advance):
        self._items, self._advance = iter(items), advance

    def get_next(self):
        item = next(self._items, None)
        if item is not None:
            self._advance()
        return item

    def rewind(self):  # some calibrators ask for it; we are only read once
        pass


def basic_optimized(ctx: BuildContext, target: Path) -> Path:
    """The ORT source at ONNX Runtime's portable (basic) level, written to `target`: constants folded (a
    transposed weight becomes an initializer), redundant nodes gone; hardware-specific fusions happen at load."""
    import onnxruntime as ort

    source = ort_source(ctx)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    if ctx.external_data:  # keep the weights beside the graph, as the source had them
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         onnx_files.data_location(target))
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return target


def onnx_fp32(ctx: BuildContext, variant: VariantSpec) -> Built:
    target = basic_optimized(ctx, ctx.workdir / f"{variant.name}.onnx")
    return Built(_runner(ctx, variant.name, target), target, parent="export", options={"optimization": "basic"},
                 notes=_mish_notes(ctx))


def _dynamic(ctx: BuildContext, source: Path, target: Path, op_types: list[str], exclude: list[str] | None = None,
             extra_options: dict | None = None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Without VNNI the dynamic kernels saturate too (LSTM agreement 96.7% -> 100% with 7-bit weights).
    with _quiet():
        quantize_dynamic(str(source), str(target), op_types_to_quantize=op_types, weight_type=QuantType.QInt8,
                         nodes_to_exclude=list(exclude or []), use_external_data_format=ctx.external_data,
                         reduce_range=ctx.hardware.reduce_range, extra_options=extra_options)


def _left_in_fp32(path: Path, op_types: list[str], excluded: list[str]) -> list[str]:
    """A note when recurrent ops asked for INT8 are still plain FP32 ops: the quantizer skips
    them silently when their weights are not constant initializers."""
    import onnx

    left = [n for n in onnx.load(str(path), load_external_data=False).graph.node
            if n.op_type in op_types and n.op_type in RECURRENT_OPS and n.name not in excluded]
    if not left:
        return []
    kinds = ", ".join(sorted({n.op_type for n in left}))
    return [f"{len(left)} {kinds} node(s) stayed FP32: the quantizer could not see their weights as constant "
            "initializers, so they were not quantized"]


def ort_int8_dynamic(ctx: BuildContext, variant: VariantSpec) -> Built:
    ops = variant.opTypes or DYNAMIC_DEFAULT_OPS
    target = ctx.workdir / f"{variant.name}.onnx"
    _dynamic(ctx, preprocessed(ctx), target, ops)
    notes = _left_in_fp32(target, ops, variant.excludeNodes)
    if "Conv" in ops:
        notes.append("Conv is dynamically quantized to ConvInteger, which is usually slower than FP32 Conv on CPU")
    options = {"opTypes": ops, "weights": "int8", "reduceRange": ctx.hardware.reduce_range}
    return Built(_runner(ctx, variant.name, target), target, parent="onnx-fp32", options=options, notes=notes)


def _static(ctx: BuildContext, variant: VariantSpec, target: Path) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[variant.calibration]
    reduce_range = ctx.hardware.reduce_range  # 7-bit weights without VNNI (optimizer/measure/hardware.py)
    options = {"format": "QDQ", "perChannel": variant.perChannel, "calibration": variant.calibration,
               "activations": "uint8", "weights": "int8", "reduceRange": reduce_range,
               "calibrationSamples": len(ctx.dataset.calibration)}
    if variant.excludeNodes:
        options["excludeNodes"] = list(variant.excludeNodes)
    source, items = preprocessed(ctx), ctx.dataset.calibration
    from optimizer.engines.mish import rewritten_nodes

    kept_fp32 = list(variant.excludeNodes) + rewritten_nodes(source)  # Mish's pieces: no Q/DQ of their own
    with ctx.reporter.task(f"calibrating {variant.name} ({variant.calibration})", len(items)) as advance, _quiet():
        quantize_static(
            str(source), str(target), _Calibration(items, advance),
            quant_format=QuantFormat.QDQ, per_channel=variant.perChannel, reduce_range=reduce_range,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
            op_types_to_quantize=variant.opTypes, nodes_to_exclude=kept_fp32,
            extra_options={"CalibPercentile": 99.999} if variant.calibration == "percentile" else {},
            use_external_data_format=ctx.external_data,
        )
    return options


def _static_key(variant: VariantSpec) -> tuple:
    """What makes two static builds the same model (the variant's name does not)."""
    return ("static", variant.calibration, variant.perChannel, tuple(variant.opTypes or ()), tuple(variant.excludeNodes))


def ort_int8_static(ctx: BuildContext, variant: VariantSpec) -> Built:
    target = ctx.workdir / f"{variant.name}.onnx"
    options = _static(ctx, variant, target)
    notes = []
    left = sorted(set(op_counts(target)) & set(RECURRENT_OPS))
    if left:
        notes.append(f"{', '.join(left)} stay FP32 in static QDQ; ort-int8-static-dynamic quantizes them dynamically")
    built = Built(_runner(ctx, variant.name, target), target, parent="onnx-fp32", options=options,
                  notes=notes + _mish_notes(ctx))
    # ort-int8-static-dynamic with the same options is this very model when it has no LSTM/GRU
    ctx.cache[_static_key(variant)] = (variant.name, not left)
    return built


def same_as_static(ctx: BuildContext, variant: VariantSpec) -> None:
    """On a model without LSTM/GRU, static-dynamic is the static model: skip it (NotApplicable) when an
    ort-int8-static variant with the same options was built, instead of building, timing and falling
    back on the same model twice."""
    name, no_recurrent = ctx.cache.get(_static_key(variant), (None, False))
    if name is not None and no_recurrent:
        raise NotApplicable(f"the model has no LSTM/GRU, so this is the same model as {name} (static INT8 with the "
                            "same options): not built twice")


def ort_int8_static_dynamic(ctx: BuildContext, variant: VariantSpec) -> Built:
    static_path = ctx.workdir / f"{variant.name}.static.onnx"
    target = ctx.workdir / f"{variant.name}.onnx"
    same_as_static(ctx, variant)
    options = _static(ctx, variant, static_path)
    recurrent = sorted(set(op_counts(static_path)) & set(RECURRENT_OPS))
    notes = []
    if recurrent:
        _dynamic(ctx, static_path, target, recurrent, variant.excludeNodes)
        options["dynamicOpTypes"] = recurrent
        notes += _left_in_fp32(target, recurrent, variant.excludeNodes)
        onnx_files.remove(static_path)
    else:
        onnx_files.move(static_path, target)
        notes.append("the model has no LSTM/GRU, so this equals ort-int8-static")
    return Built(_runner(ctx, variant.name, target), target, parent="onnx-fp32", options=options, notes=notes)


def onnx_fp16(ctx: BuildContext, variant: VariantSpec) -> Built:
    if ctx.device != "cuda":
        raise NotApplicable(
            "not applicable on CPU: FP16 needs the CUDA execution provider "
            "(ONNX Runtime's CPU provider lacks FP16 kernels for most ops and would insert casts)"
        )
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    target = ctx.workdir / f"{variant.name}.onnx"
    model = convert_float_to_float16(onnx.load(str(ctx.require_onnx())), keep_io_types=True)
    onnx.save(model, str(target), save_as_external_data=ctx.external_data, all_tensors_to_one_file=True,
              location=onnx_files.data_location(target))
    return Built(_runner(ctx, variant.name, target), target, parent="onnx-fp32", options={"keepIoTypes": True})
