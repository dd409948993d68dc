"""The accuracy fallback: a static INT8 variant that misses the budget is rebuilt with its most
sensitive nodes kept in FP32, 1, 2, 4, 8 … ranked nodes at a time, until one meets the budget or
`acceptance.fallbackSeconds` is spent. The second try keeps every noise-adding node in FP32: when
even that misses the budget, nothing smaller can meet it and the search stops. Every try is
recorded; the smallest exclusion that meets the budget becomes a variant of its own
(`<name>+fallback`), so the rejected original stays in the results beside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from optimizer.api.errors import failure_reason
from optimizer.api.results import Fallback, FallbackTry, VariantResult, VariantStatus
from optimizer.engines import CALIBRATED_RECIPES, Built
from optimizer.steps.run import Run
from optimizer.steps.select import budget_failure
from optimizer.measure.sensitivity import exclusion, exclusion_sizes, rank_nodes
from optimizer.api.spec import VariantSpec

SENSITIVITY_ITEMS = 8  # calibration items run through both models to rank the nodes
LARGE_MODEL_BYTES = 100e6  # above this, every activation of 8 items kept in memory twice would not fit
LARGE_MODEL_ITEMS = 2  # (YOLOv4 at 320×320: ~0.7 GB of activations per item and model)


def sensitivity_items(float_model: Path) -> int:
    from optimizer.artifacts import onnx_files

    return LARGE_MODEL_ITEMS if onnx_files.total_size(float_model) > LARGE_MODEL_BYTES else SENSITIVITY_ITEMS


RANKING_KEPT = 20  # ranked nodes recorded in results.json
SUFFIX = "+fallback"


@dataclass
class Attempt:
    """One build for the fallback: the pipeline's build and evaluation, behind two callables."""

    build: Callable[[VariantSpec], tuple[VariantResult, Built | None]]
    accuracy: Callable[[Built], float]  # on the evaluation items
    budget_failure: Callable[[float], str | None]  # accuracy -> why it misses the budget, or None


def recover(variant: VariantSpec, quantized: Path, float_model: Path, items: list[dict], workdir: Path,
            seconds: float, attempt: Attempt) -> tuple[Fallback, VariantResult | None, Built | None]:
    """(the fallback record, the recovered variant's VariantResult and Built) or (record, None, None)."""
    start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - start  # noqa: E731
    ranking = rank_nodes(float_model, quantized, items[:sensitivity_items(float_model)],
                         workdir / f"{variant.name}.sensitivity")
    record = Fallback(ranking=[r.record() for r in ranking[:RANKING_KEPT]])
    # Nodes that add no noise (their output is as good as their input) are never worth FP32.
    candidates = [r for r in ranking if r.added_noise > 0]
    sizes = exclusion_sizes(len(candidates))
    # The ceiling (every noise-adding node in FP32) is tried second: when even it misses the budget no
    # smaller exclusion can meet it, and the search stops there instead of building 2, 4, 8 … in vain
    # (each build calibrates again: ~12 s on zoo:yolov4). When it meets the budget the search goes on for
    # fewer nodes, and builds the ceiling again last, to keep it, only if none of those meets it.
    plan = sizes if len(sizes) <= 2 else [sizes[0], sizes[-1], *sizes[1:]]
    tried: list[list[str]] = []
    for position, count in enumerate(plan):
        nodes = exclusion(candidates, count)
        probe = len(plan) > len(sizes) and position == 1
        if nodes in tried and not probe:
            continue
        if elapsed() > seconds:
            record.reason = f"acceptance.fallbackSeconds ({seconds:g} s) spent after {len(record.tries)} tries"
            break
        if not probe:
            tried.append(nodes)
        retry = variant.model_copy(update={"name": variant.name + SUFFIX,
                                           "excludeNodes": [*variant.excludeNodes, *nodes]})
        began = time.perf_counter()
        result, built = attempt.build(retry)
        entry = FallbackTry(excludedNodes=nodes, seconds=0.0)
        if built is None:
            entry.error = result.error
        else:
            entry.accuracy, entry.sizeBytes = attempt.accuracy(built), built.size_bytes
            entry.withinBudget = attempt.budget_failure(entry.accuracy) is None
        entry.seconds = round(time.perf_counter() - began, 3)
        record.tries.append(entry)
        if probe:
            if entry.accuracy is not None and not entry.withinBudget:
                record.reason = (f"even with all {len(candidates)} noise-adding node(s) in FP32 ({len(nodes)} with "
                                 f"their feeders) it scores {entry.accuracy:.4f}, outside the budget: keeping fewer in "
                                 "FP32 cannot meet it, so the search stopped there")
                break
            continue
        if entry.withinBudget:
            record.recovered, record.excludedNodes, record.variant = True, nodes, retry.name
            record.seconds = round(elapsed(), 3)
            return record, result, built
    if not candidates:
        record.reason = "no quantized node adds measurable noise; nothing to keep in FP32"
    elif record.reason is None:
        record.reason = "no try met the budget, even with every noise-adding node in FP32"
    record.seconds = round(elapsed(), 3)
    return record, None, None


def _budget_failure(run: Run, value: float) -> str | None:
    acceptance = run.spec.spec.acceptance
    return budget_failure(value, run.baseline.accuracy, acceptance.maxAccuracyDrop,
                          acceptance.maxRelativeAccuracyDrop, run.metric)


def _needs_fallback(run: Run, name: str) -> bool:
    result = run.results[name]
    return (result.recipe in CALIBRATED_RECIPES and result.status == VariantStatus.ok.value and result.accuracy is not None
            and run.baseline.accuracy is not None and _budget_failure(run, result.accuracy) is not None)


def fallback_step(run: Run) -> None:
    """Retry each ORT static variant that misses the budget with its most sensitive nodes in FP32."""
    from optimizer.engines import registry
    from optimizer.engines.ort import preprocessed
    from optimizer.steps.evaluate import evaluate_variant
    from optimizer.steps.variants import build_variant, keep_variant

    if not run.spec.spec.acceptance.fallback:
        return
    recipes, models_dir = registry(), run.staging / "models"
    scratch = run.scratch / "fallback"

    def score(built: Built) -> float:
        probe = VariantResult(name="probe", recipe="probe", status=VariantStatus.ok)
        evaluate_variant(run, probe, built.runner)
        return probe.accuracy if probe.accuracy is not None else float("-inf")

    def build(spec: VariantSpec) -> tuple[VariantResult, Built | None]:
        run.reporter.log(f"fallback: rebuilding {spec.name} with {len(spec.excludeNodes)} node(s) in FP32")
        return build_variant(run.context, spec, recipes)

    def scored(built: Built) -> float:
        value = score(built)
        run.reporter.log(f"fallback: {run.metric} {value:.4f} (FP32 {run.baseline.accuracy:.4f})")
        return value

    attempt = Attempt(build=build, accuracy=scored, budget_failure=lambda value: _budget_failure(run, value))
    ordered: dict[str, VariantResult] = {}
    for name, result in run.results.items():
        ordered[name] = result
        if name not in run.built or not _needs_fallback(run, name):
            continue
        run.reporter.log(f"{name} misses the accuracy budget: ranking its nodes by sensitivity and retrying")
        try:
            record, recovered, built = recover(
                run.planned[name], run.built[name].artifact, preprocessed(run.context), run.dataset.calibration,
                scratch, run.spec.spec.acceptance.fallbackSeconds, attempt)
        except Exception as error:  # the analysis never costs the run its other results; a bug says so
            record, recovered, built = Fallback(reason=failure_reason(error, "sensitivity analysis failed")), None, None
        result.fallback = record
        if built is None:
            run.reporter.log(f"{name}: fallback did not recover it ({record.reason})")
            continue
        spec = run.planned[name].model_copy(update={
            "name": record.variant, "excludeNodes": [*run.planned[name].excludeNodes, *record.excludedNodes]})
        keep_variant(spec, recovered, built, models_dir)
        recovered.lineage.parent = name
        recovered.calibrationOf = result.calibrationOf
        recovered.notes.append(f"the accuracy fallback kept {len(record.excludedNodes)} node(s) of {name} in FP32: "
                               + ", ".join(record.excludedNodes))
        evaluate_variant(run, recovered, built.runner)
        run.planned[spec.name], run.built[spec.name], ordered[spec.name] = spec, built, recovered
        run.reporter.log(f"{name}: recovered as {spec.name} ({len(record.excludedNodes)} node(s) in FP32)")
    run.results = ordered
