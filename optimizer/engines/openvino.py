"""OpenVINO recipes: the verified ONNX model as OpenVINO IR, compiled by OpenVINO's CPU plugin.

Users compare us with OpenVINO, so its variants sit in the same table, timed by the same
interleaved harness and checked against the same FP32 reference:
- `openvino-fp32`: IR, FP32 arithmetic pinned (INFERENCE_PRECISION_HINT f32);
- `openvino-default`: the same IR with OpenVINO's default precision (bf16 on AMX or AVX-512 BF16
  CPUs, f32 elsewhere; the variant's provider says which ran);
- `openvino-int8`: NNCF post-training INT8 on the spec's calibration data, weights 7-bit on CPU
  classes without VNNI (NNCF's overflow fix, as the hardware profile says); when that data has
  labels, NNCF's accuracy control (`nncf.quantize_with_accuracy_control`) keeps the layers that
  cost accuracy in FP32 until half the spec's budget holds on labelled items it did not calibrate
  on, scored with the run's own metric;
- `openvino-ort-qdq`: mlopt's own `ort-int8-static` QDQ model, compiled by OpenVINO.

The IR is `<variant>.xml` plus `<variant>.bin` (weights); its size counts both. OpenVINO and NNCF
are optional: where they are not installed the variants are skipped, saying so.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from optimizer.measure.metrics import METRICS
from optimizer.engines import BuildContext, Built, NotApplicable
from optimizer.engines.runners import OpenVinoRunner
from optimizer.api.spec import DETECTION_METRICS, LABELLED_METRICS, VariantSpec


def _engine(ctx: BuildContext, needs_nncf: bool = False):
    if ctx.device != "cpu":
        raise NotApplicable("OpenVINO recipes run on the CPU plugin; not applicable with benchmark.device cuda")
    try:
        import openvino as ov

        if needs_nncf:
            import nncf  # noqa: F401
    except ImportError as error:
        raise NotApplicable(f"skipped (not installed): {error.name} is missing; pip install 'mlopt[optimizer]' "
                            "brings openvino and nncf") from None
    return ov


def _save(ov, model, target: Path, compress_to_fp16: bool = False) -> Path:
    ov.save_model(model, str(target), compress_to_fp16=compress_to_fp16)  # by default weights stay FP32 (or INT8)
    return target


def _built(ctx: BuildContext, path: Path, precision: str | None, parent: str, options: dict) -> Built:
    runner = OpenVinoRunner(path, threads=ctx.threads, precision=precision)
    return Built(runner, path, parent=parent, options={"engine": "openvino", **options},
                 notes=[f"OpenVINO ran it in {runner.provider}"] if precision is None else [])


def _converted(ctx: BuildContext, variant: VariantSpec, precision: str | None) -> Built:
    """The verified FP32 export as IR, compiled at `precision` (None: OpenVINO's default, saved as
    `ov.save_model` saves by default: FP16 weights, half the file, widened again when compiled)."""
    ov = _engine(ctx)
    default = precision is None
    path = _save(ov, ov.convert_model(str(ctx.require_onnx())), ctx.workdir / f"{variant.name}.xml",
                 compress_to_fp16=default)
    built = _built(ctx, path, precision, "onnx-fp32", {"precision": precision or "OpenVINO's default",
                                                       "weights": "fp16" if default else "fp32"})
    if default:
        built.notes.append("weights stored as FP16 (ov.save_model's default): half the FP32 IR; the CPU plugin "
                           "widens them when it compiles the model")
    return built


def openvino_fp32(ctx: BuildContext, variant: VariantSpec) -> Built:
    return _converted(ctx, variant, "f32")


def openvino_default(ctx: BuildContext, variant: VariantSpec) -> Built:
    return _converted(ctx, variant, None)


# NNCF stops at this fraction of acceptance.maxAccuracyDrop; the rest is margin for the validation
# split's sampling noise. At the full budget (10 points) the Outlier test model passed NNCF's validation
# 9.4 points down and scored 14.1 down on held-out items (64 each, AVX2 EPYC, overflow fix off); with
# 128 items each, 7-9 points down whatever the split or overflow fix. At half, every setting measured
# stayed within 2.3 points on held-out items.
NNCF_BUDGET_SHARE = 0.5


def _validation_split(ctx: BuildContext) -> tuple[list[dict], list[tuple[dict, np.ndarray]]] | str:
    """(calibration items, validation pairs) for accuracy control, or why it cannot run.

    Both come from the labelled calibration items, never from the held-out evaluation items that
    decide the variant; NNCF validates on items its ranges were not fitted to, like held-out data.
    Interleaved (even items calibrate, odd validate), so a file sorted by class gives both every class."""
    labels = getattr(ctx.dataset, "calibration_labels", None)
    if labels is None:
        return f"data.source {ctx.data_source} has no labels; accuracy control needs labels"
    if ctx.metric in DETECTION_METRICS:  # box mAP needs the detection spec and labelled boxes, which NNCF's pairs lack
        return f"acceptance.metric is {ctx.metric}; NNCF's accuracy control cannot score boxes"
    if ctx.metric not in LABELLED_METRICS:
        return "acceptance.metric is agreement; accuracy control needs a metric scored against labels"
    items = ctx.dataset.calibration
    if len(items) < 2:
        return ("one labelled calibration item cannot both calibrate and validate; accuracy control needs "
                "data.samples of at least twice the batch")
    return items[0::2], list(zip(items[1::2], labels[1::2]))


def _validation_fn(metric: str):
    """NNCF calls this with a compiled model (FP32 arithmetic) and (inputs, labels) pairs."""

    def validate(compiled, pairs) -> float:
        outputs, labels = [], []
        for feed, item_labels in pairs:
            result = compiled(feed)
            outputs.append([np.asarray(result[port]) for port in compiled.outputs])
            labels.append(item_labels)
        return METRICS[metric](outputs, labels)

    return validate


def _overflow_fix(ctx: BuildContext) -> tuple[str, str]:
    """NNCF's weight range for the target CPU class (optimizer/measure/hardware.py): (value, note)."""
    fix, isa = ctx.hardware.overflow_fix, ctx.hardware.isa
    if fix == "enable":
        why = (f"{isa} has no VNNI: u8×s8 products are summed in 16 bits, so Conv/MatMul weights use 7 bits "
               "and the sums cannot saturate")
    else:
        why = f"{isa} accumulates INT8 in 32 bits, so weights use the full int8 range"
    return fix, f"overflow fix: {fix} ({why})"


def _quantize(ctx: BuildContext, model, names: list[str]) -> tuple[object, dict, list[str]]:
    """NNCF INT8, accuracy-controlled when the data has labels: (model, options, notes)."""
    import nncf

    fix, fix_note = _overflow_fix(ctx)
    advanced = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix(fix))

    def inputs_of(item: dict) -> dict:
        return {n: item[n] for n in names}

    split = _validation_split(ctx)
    if isinstance(split, str):
        items = ctx.dataset.calibration
        quantized = nncf.quantize(model, nncf.Dataset(items, inputs_of), subset_size=len(items),
                                  advanced_parameters=advanced)
        options = {"quantizer": "nncf.quantize (post-training)", "calibrationSamples": len(items), "overflowFix": fix}
        return quantized, options, [
            f"NNCF mode: plain post-training quantization ({split})", fix_note]
    calibration, validation = split
    budget = ctx.acceptance.maxAccuracyDrop
    max_drop = budget * NNCF_BUDGET_SHARE
    quantized = nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(calibration, inputs_of), nncf.Dataset(validation, lambda pair: inputs_of(pair[0])),
        _validation_fn(ctx.metric), max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calibration), advanced_quantization_parameters=advanced)
    options = {"quantizer": "nncf.quantize_with_accuracy_control", "calibrationSamples": len(calibration),
               "validationMetric": ctx.metric, "validationSamples": len(validation),
               "validationSplit": "odd-numbered labelled calibration items (the even-numbered ones calibrate)",
               "maxDrop": max_drop, "overflowFix": fix}
    note = (f"NNCF mode: accuracy control, {ctx.metric} on {len(validation)} labelled calibration item(s) kept out "
            f"of the {len(calibration)} that calibrate, at most {max_drop * 100:.2f} points below FP32: "
            f"{NNCF_BUDGET_SHARE:.0%} of acceptance.maxAccuracyDrop ({budget * 100:.2f}), the rest is margin for "
            "that split's sampling noise; the held-out split decides")
    if ctx.acceptance.maxRelativeAccuracyDrop is not None:
        note += "; maxRelativeAccuracyDrop is checked afterwards, as for every variant (NNCF takes one budget)"
    return quantized, options, [note, fix_note]


def _fake_quantize_count(model) -> int:
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def openvino_int8(ctx: BuildContext, variant: VariantSpec) -> Built:
    ov = _engine(ctx, needs_nncf=True)
    import nncf

    nncf.set_log_level(logging.ERROR)
    names = [spec.name for spec in ctx.loaded.inputs]
    model = ov.convert_model(str(ctx.require_onnx()))
    with warnings.catch_warnings(), ctx.reporter.task(f"calibrating {variant.name} (NNCF)", 1) as advance:
        warnings.simplefilter("ignore")
        quantized, options, notes = _quantize(ctx, model, names)
        advance()
    options["fakeQuantizeNodes"] = _fake_quantize_count(quantized)  # fewer after accuracy control reverts layers
    if not options["fakeQuantizeNodes"] and "validationMetric" in options:
        notes.append("accuracy control kept every layer in FP32: no INT8 layer met the budget on the validation items")
    path = _save(ov, quantized, ctx.workdir / f"{variant.name}.xml")
    built = _built(ctx, path, "f32", "onnx-fp32", options)
    built.notes.extend(notes)
    return built


def openvino_ort_qdq(ctx: BuildContext, variant: VariantSpec) -> Built:
    """mlopt's QDQ model (ort-int8-static's recipe, minmax) run by OpenVINO instead of ONNX Runtime."""
    ov = _engine(ctx)
    from optimizer.engines.ort import _static

    qdq = ctx.workdir / f"{variant.name}.qdq.onnx"
    options = _static(ctx, variant, qdq)
    path = _save(ov, ov.convert_model(str(qdq)), ctx.workdir / f"{variant.name}.xml")
    return _built(ctx, path, "f32", "onnx-fp32", {"qdq": options})
