"""OpenVINO recipes: the verified ONNX model as OpenVINO IR, compiled by OpenVINO's CPU plugin.

Users compare us with OpenVINO, so its variants sit in the same table, timed by the same
interleaved harness and checked against the same FP32 reference:
- `openvino-fp32`: IR, FP32 arithmetic pinned (INFERENCE_PRECISION_HINT f32);
- `openvino-default`: the same IR with OpenVINO's default precision (bf16 on AMX or AVX-512 BF16
  CPUs, f32 elsewhere; the variant's provider says which ran);
- `openvino-int8`: NNCF post-training INT8 on the spec's calibration data; when that data has
  labels, NNCF's accuracy control (`nncf.quantize_with_accuracy_control`) keeps the layers that
  cost accuracy in FP32 until the spec's budget holds, scored with the run's own metric;
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


def _save(ov, model, target: Path) -> Path:
    ov.save_model(model, str(target), compress_to_fp16=False)  # weights stay FP32 (or INT8) as built
    return target


def _built(ctx: BuildContext, path: Path, precision: str | None, parent: str, options: dict) -> Built:
    runner = OpenVinoRunner(path, threads=ctx.threads, precision=precision)
    return Built(runner, path, parent=parent, options={"engine": "openvino", **options},
                 notes=[f"OpenVINO ran it in {runner.provider}"] if precision is None else [])


def _converted(ctx: BuildContext, variant: VariantSpec, precision: str | None) -> Built:
    """The verified FP32 export as IR, compiled at `precision` (None: OpenVINO's default)."""
    ov = _engine(ctx)
    path = _save(ov, ov.convert_model(str(ctx.require_onnx())), ctx.workdir / f"{variant.name}.xml")
    return _built(ctx, path, precision, "onnx-fp32", {"precision": precision or "OpenVINO's default"})


def openvino_fp32(ctx: BuildContext, variant: VariantSpec) -> Built:
    return _converted(ctx, variant, "f32")


def openvino_default(ctx: BuildContext, variant: VariantSpec) -> Built:
    return _converted(ctx, variant, None)


def _labelled_split(ctx: BuildContext) -> list[tuple[dict, np.ndarray]] | None:
    """The calibration items with their labels, when the run's metric is scored against labels.

    Accuracy control validates on this split, not on the held-out evaluation items, so the
    accuracy that decides the variant is measured on data the quantizer never tuned itself on."""
    labels = getattr(ctx.dataset, "calibration_labels", None)
    # Box mAP needs the detection spec and labelled boxes, which NNCF's validation pairs do not carry.
    if labels is None or ctx.metric not in LABELLED_METRICS or ctx.metric in DETECTION_METRICS:
        return None
    return list(zip(ctx.dataset.calibration, labels))


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


def _quantize(ctx: BuildContext, model, names: list[str]) -> tuple[object, dict, str]:
    """NNCF INT8, accuracy-controlled when the data has labels: (model, options, note)."""
    import nncf

    items = ctx.dataset.calibration
    calibration = nncf.Dataset(items, lambda item: {n: item[n] for n in names})
    split = _labelled_split(ctx)
    if split is None:
        quantized = nncf.quantize(model, calibration, subset_size=len(items))
        labelled = getattr(ctx.dataset, "calibration_labels", None) is not None
        why = (f"acceptance.metric is {ctx.metric}" if labelled else f"data.source {ctx.data_source} has no labels")
        options = {"quantizer": "nncf.quantize (post-training)", "calibrationSamples": len(items)}
        return quantized, options, f"NNCF mode: plain post-training quantization ({why}; accuracy control needs labels)"
    budget = ctx.acceptance.maxAccuracyDrop
    quantized = nncf.quantize_with_accuracy_control(
        model, calibration, nncf.Dataset(split, lambda pair: {n: pair[0][n] for n in names}),
        _validation_fn(ctx.metric), max_drop=budget, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(items))
    options = {"quantizer": "nncf.quantize_with_accuracy_control", "calibrationSamples": len(items),
               "validationMetric": ctx.metric, "validationSamples": len(split), "maxDrop": budget}
    note = (f"NNCF mode: accuracy control, {ctx.metric} on the {len(split)} labelled calibration item(s), at most "
            f"{budget * 100:.2f} points below FP32 (acceptance.maxAccuracyDrop)")
    if ctx.acceptance.maxRelativeAccuracyDrop is not None:
        note += "; maxRelativeAccuracyDrop is checked afterwards, as for every variant (NNCF takes one budget)"
    return quantized, options, note


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
        quantized, options, note = _quantize(ctx, model, names)
        advance()
    options["fakeQuantizeNodes"] = _fake_quantize_count(quantized)  # fewer after accuracy control reverts layers
    path = _save(ov, quantized, ctx.workdir / f"{variant.name}.xml")
    built = _built(ctx, path, "f32", "onnx-fp32", options)
    built.notes.append(note)
    return built


def openvino_ort_qdq(ctx: BuildContext, variant: VariantSpec) -> Built:
    """mlopt's QDQ model (ort-int8-static's recipe, minmax) run by OpenVINO instead of ONNX Runtime."""
    ov = _engine(ctx)
    from optimizer.engines.ort import _static

    qdq = ctx.workdir / f"{variant.name}.qdq.onnx"
    options = _static(ctx, variant, qdq)
    path = _save(ov, ov.convert_model(str(qdq)), ctx.workdir / f"{variant.name}.xml")
    return _built(ctx, path, "f32", "onnx-fp32", {"qdq": options})
