"""The accuracy fallback: a static INT8 variant that misses the budget is rebuilt with its most
sensitive nodes kept in FP32, 1, 2, 4, 8 … ranked nodes at a time, until one meets the budget or
`acceptance.fallbackSeconds` is spent. Every try is recorded; the smallest exclusion that meets
the budget becomes a variant of its own (`<name>+fallback`), so the rejected original stays in
the results beside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from optimizer.api.results import Fallback, FallbackTry
from optimizer.measure.sensitivity import exclusion, exclusion_sizes, rank_nodes
from optimizer.api.spec import Recipe, VariantSpec

RECIPES = (Recipe.ort_int8_static.value, Recipe.ort_int8_static_dynamic.value)
SENSITIVITY_ITEMS = 8  # calibration items run through both models to rank the nodes
RANKING_KEPT = 20  # ranked nodes recorded in results.json
SUFFIX = "+fallback"


@dataclass
class Attempt:
    """One build for the fallback: the pipeline's build and evaluation, behind two callables."""

    build: Callable[[VariantSpec], tuple[object, object | None]]  # spec -> (VariantResult, Built | None)
    accuracy: Callable[[object], float]  # Built -> accuracy on the evaluation items
    budget_failure: Callable[[float], str | None]  # accuracy -> why it misses the budget, or None


def recover(variant: VariantSpec, quantized: Path, float_model: Path, items: list[dict], workdir: Path,
            seconds: float, attempt: Attempt) -> tuple[Fallback, object | None, object | None]:
    """(the fallback record, the recovered variant's VariantResult and Built) or (record, None, None)."""
    start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - start  # noqa: E731
    ranking = rank_nodes(float_model, quantized, items[:SENSITIVITY_ITEMS], workdir / f"{variant.name}.sensitivity")
    record = Fallback(ranking=[r.record() for r in ranking[:RANKING_KEPT]])
    # Nodes that add no noise (their output is as good as their input) are never worth FP32.
    candidates = [r for r in ranking if r.added_noise > 0]
    tried: list[list[str]] = []
    for count in exclusion_sizes(len(candidates)):
        nodes = exclusion(candidates, count)
        if nodes in tried:
            continue
        if elapsed() > seconds:
            record.reason = f"acceptance.fallbackSeconds ({seconds:g} s) spent after {len(record.tries)} tries"
            break
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
