"""The select step: apply the accuracy budget, explain slow variants, pick the fastest that qualifies.

A variant slower than the baseline is never picked, and its notes say why we think it is slow.
"""

from __future__ import annotations

from optimizer.api.errors import DataLoadError
from optimizer.api.results import VariantResult, VariantStatus, baseline_label
from optimizer.api.spec import BOX_LABEL_METRICS, DETECTION_METRICS, LABELLED_METRICS, SEQUENCE_METRICS, Recipe
from optimizer.api.units import format_size
from optimizer.measure.hardware import VNNI_FLAGS
from optimizer.steps.run import Run

_INTEGER_OPS = ("ConvInteger", "MatMulInteger")
GPU_PROVIDERS = ("CUDA", "CUDAExecutionProvider")  # what PyTorch's and ONNX Runtime's runners report on a GPU


def explain_slowness(variant: VariantResult, counterpart: VariantResult, cpu_flags: list[str]) -> str:
    """A best guess, from the graph and the CPU, at why a variant is slower than its FP32 counterpart."""
    ratio = variant.latencyMs.mean / counterpart.latencyMs.mean
    head = f"{ratio:.2f}x the latency of {counterpart.name} ({variant.latencyMs.mean:.2f} vs {counterpart.latencyMs.mean:.2f} ms)"
    if variant.provider in GPU_PROVIDERS:
        return (f"{head}: on the GPU, probably because at this batch size its kernels are short and launch-bound, "
                "so a lower precision or other kernels save less than their extra casts and launches cost")
    if variant.opCounts.get("MatMulNBits"):
        return (f"{head}: 4-bit weight-only MatMulNBits unpacks its weight blocks on every call; a forward over a "
                "whole sequence is compute-bound, so the smaller weights save less than the unpacking costs. It "
                "pays off where weights dominate the memory traffic: generation one token at a time, large models")
    if variant.recipe == Recipe.ort_transformer_fp32.value:
        return (f"{head}: the fused transformer ops (Attention, SkipLayerNormalization, Gelu) ran slower here than "
                "the separate kernels ONNX Runtime's own load-time optimizations give at this shape and thread count")
    integer_ops = {op: n for op, n in variant.opCounts.items() if op in _INTEGER_OPS}
    if integer_ops:
        listed = ", ".join(f"{op} ×{n}" for op, n in integer_ops.items())
        return (f"{head}: the graph runs {listed}; ONNX Runtime's CPU integer kernels for these are slower "
                "than FP32 Conv/MatMul. Quantize convolutions statically (ort-int8-static) or restrict opTypes.")
    if not VNNI_FLAGS & set(cpu_flags):
        return f"{head}: this CPU has no VNNI/AMX, so INT8 dot products are not faster than FP32 ones"
    if variant.provider and counterpart.provider and variant.provider != counterpart.provider:
        return f"{head}: it ran on {variant.provider}, its counterpart on {counterpart.provider}"
    dq = variant.opCounts.get("DequantizeLinear", 0) + variant.opCounts.get("QuantizeLinear", 0)
    if dq:
        return (f"{head}: {dq} Quantize/DequantizeLinear nodes remain after optimization; the conversions "
                "cost more than the INT8 arithmetic saves on this model")
    return f"{head}: quantized kernels do not pay off for this model's layer sizes"


class MetricError(DataLoadError):
    """The requested accuracy metric cannot be computed on this data (the run stops before building)."""


def resolve_metric(requested: str, model_metric: str, has_labels: bool, data_source: str,
                   sequence_labels: bool = False, detector: bool = False, box_labels: bool = False) -> str:
    """acceptance.metric → the metric actually computed. auto: the zoo model's own metric, else for a
    detector (model.detection) map50 with labelled boxes or box-agreement without; else top1 (class
    labels) or char-accuracy (padded label sequences) when the data has labels; agreement otherwise."""
    if requested == "auto":
        if detector:
            return "map50" if box_labels else (model_metric if model_metric in DETECTION_METRICS
                                               and model_metric not in BOX_LABEL_METRICS else "box-agreement")
        if not has_labels:
            return "agreement"
        if model_metric != "agreement":
            return model_metric
        return "char-accuracy" if sequence_labels else "top1"
    if requested in DETECTION_METRICS and not detector:
        raise MetricError(
            f"acceptance.metric {requested} scores boxes, but the model declares none; set model.detection "
            "(which outputs are boxes and scores, their boxFormat) or use another metric")
    if requested in BOX_LABEL_METRICS and not box_labels:
        raise MetricError(
            f"acceptance.metric {requested} needs labelled boxes, but data.source {data_source} has none; give a .npz "
            "with 'boxes' [samples, max_boxes, 4] and 'labels' [samples, max_boxes] (-1 for padding), or use "
            "metric box-agreement (FP32's detections as the reference, no labels)")
    if requested in LABELLED_METRICS and not has_labels:
        raise MetricError(
            f"acceptance.metric {requested} needs labels, but data.source {data_source} has none; "
            "give a .npz with a 'labels' array (or a labelled zoo data set), or use metric agreement"
        )
    if box_labels and requested in LABELLED_METRICS and requested not in BOX_LABEL_METRICS:
        raise MetricError(
            f"acceptance.metric {requested} does not fit data.source {data_source}, which has labelled boxes; "
            f"use {' or '.join(BOX_LABEL_METRICS)}")
    if has_labels and not box_labels and (requested in SEQUENCE_METRICS) != sequence_labels \
            and requested in LABELLED_METRICS:
        shape = "2-D label sequences (padded with -1)" if sequence_labels else "one class label per sample"
        raise MetricError(
            f"acceptance.metric {requested} does not fit data.source {data_source}, which has {shape}; "
            f"use {' or '.join(SEQUENCE_METRICS) if sequence_labels else 'top1'}"
        )
    return requested


def budget_failure(accuracy: float, reference: float, max_drop: float | None,
                   max_relative_drop: float | None, metric: str) -> str | None:
    """Why `accuracy` misses the budget (every budget it misses, by how much), or None if it meets it."""
    drop, misses = reference - accuracy, []
    if max_drop is not None and drop > max_drop + 1e-12:
        misses.append(f"{drop * 100:.2f} points below FP32's {reference:.4f}; budget maxAccuracyDrop = "
                      f"{max_drop * 100:.2f} points")
    relative = drop / reference if reference > 0 else 0.0
    if max_relative_drop is not None and relative > max_relative_drop + 1e-12:
        misses.append(f"{relative:.2%} below FP32's {reference:.4f} (relative); budget maxRelativeAccuracyDrop = "
                      f"{max_relative_drop:.2%}")
    if not misses:
        return None
    return f"{metric} {accuracy:.4f} is " + ", and ".join(misses)


def apply_budget(variant: VariantResult, baseline: VariantResult, max_drop: float | None, metric: str,
                 max_relative_drop: float | None = None) -> None:
    if variant.status != VariantStatus.ok.value or variant.accuracy is None or baseline.accuracy is None:
        return
    reason = budget_failure(variant.accuracy, baseline.accuracy, max_drop, max_relative_drop, metric)
    if reason:
        variant.status = VariantStatus.rejected.value
        variant.error = reason


def counterpart_of(variant: VariantResult, by_name: dict[str, VariantResult], baseline: VariantResult) -> VariantResult:
    """ONNX variants compare against onnx-fp32, PyTorch variants against PyTorch FP32."""
    if variant.runtime == "onnxruntime" and variant.recipe != "onnx-fp32":
        for other in by_name.values():
            if other.recipe == "onnx-fp32" and other.latencyMs:
                return other
    return baseline


# Means within 2% are run-to-run noise on a shared machine, not a regression worth a warning.
SLOWER_TOLERANCE = 1.02


def _slower(variant: VariantResult, reference: VariantResult) -> bool:
    return variant.latencyMs.mean > reference.latencyMs.mean * SLOWER_TOLERANCE


def flag_slow_variants(variants: list[VariantResult], baseline: VariantResult, cpu_flags: list[str]) -> None:
    by_name = {v.name: v for v in variants}
    for variant in variants:
        if not variant.latencyMs:
            continue
        counterpart = counterpart_of(variant, by_name, baseline)
        if counterpart is not variant and counterpart.latencyMs and _slower(variant, counterpart):
            variant.notes.append("SLOWER than FP32 — " + explain_slowness(variant, counterpart, cpu_flags))
        elif counterpart is not baseline and baseline.latencyMs and _slower(variant, baseline):
            variant.notes.append("SLOWER than FP32 — " + explain_slowness(variant, baseline, cpu_flags))


def pick_best(variants: list[VariantResult], baseline: VariantResult) -> tuple[str | None, str]:
    qualified = [v for v in variants if v.status == VariantStatus.ok.value and v.latencyMs]
    faster = [v for v in qualified if v.latencyMs.mean < baseline.latencyMs.mean]
    if not faster:
        if not qualified:
            return None, "no variant was built and within the accuracy budget; every measured variant is kept in the results"
        return None, f"no variant within the accuracy budget is faster than the baseline ({baseline_label(baseline)})"
    best = min(faster, key=lambda v: v.latencyMs.mean)
    return best.name, (f"fastest variant within the accuracy budget: {best.speedup:.2f}x faster than "
                       f"{baseline_label(baseline)} at {format_size(best.sizeBytes)}")


def select_step(run: Run) -> None:
    """Every variant against the budget, slow ones explained, then the fastest within the budget."""
    acceptance = run.spec.spec.acceptance
    variants = list(run.results.values())
    for variant in variants:
        apply_budget(variant, run.baseline, acceptance.maxAccuracyDrop, run.metric, acceptance.maxRelativeAccuracyDrop)
        if variant.fallback and variant.fallback.recovered:
            variant.notes.append(f"the accuracy fallback recovered it as {variant.fallback.variant}")
    flag_slow_variants(variants, run.baseline, run.env.cpuFlags)
    run.best, run.best_reason = pick_best(variants, run.baseline)
