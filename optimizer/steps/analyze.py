"""Analyze: explain the pick. The model's arithmetic against this machine's limits, where the best
variant's time goes by op type, a scaling table by batch and threads, and optional session tuning."""

from __future__ import annotations

from optimizer.api.results import BASELINE_NAME, Analysis, VariantResult
from optimizer.engines.runners import OrtRunner
from optimizer.engines.feeds import random_feed
from optimizer.steps.run import Run


def _compute(run: Run, best: VariantResult | None, flags: list[str]) -> dict | None:
    from optimizer.measure.compute import (clock_ghz, compute_limits, count_products, gemm_peaks, macs_by_type,
                                   measured_limits, shape_limits)

    if not run.loaded.is_eager or run.spec.spec.benchmark.device != "cpu":
        return None  # hooks need the Python module, on the CPU
    products = count_products(run.loaded.module, random_feed(run.loaded.inputs), [s.name for s in run.loaded.inputs])
    if not products:
        return None
    by_type = macs_by_type(products)
    macs = sum(by_type.values())
    threads = run.spec.spec.benchmark.threads
    nominal = compute_limits(macs, flags, clock_ghz())
    measured = measured_limits(macs, gemm_peaks(threads), nominal["fp32MacsPerCycle"])
    at_shapes = shape_limits(products, threads)
    compute = {"macs": macs, "byType": by_type, "nominal": nominal, "measured": measured, "atShapes": at_shapes}
    if best and best.latencyMs:
        precision = "int8" if "int8" in best.recipe else "fp32"
        mean = best.latencyMs.mean
        compute["best"] = {"variant": best.name, "precision": precision, "meanMs": mean,
                           "limitMs": at_shapes[f"{precision}LimitMs"],
                           "fractionOfLimit": at_shapes[f"{precision}LimitMs"] / mean,
                           "peakLimitMs": measured[f"{precision}LimitMs"],
                           "fractionOfPeakLimit": measured[f"{precision}LimitMs"] / mean}
    return compute


def analyze_step(run: Run) -> None:
    """Explain the pick: arithmetic vs the machine's limit, time per op type, scaling, tuning."""
    from optimizer.measure.compute import layer_efficiency
    from optimizer.measure.profiling import op_time_split
    from optimizer.measure.scaling import batchable, scale
    from optimizer.measure.tuning import tune

    bench, inputs, best = run.spec.spec.benchmark, run.loaded.inputs, run.best
    analysis = run.analysis = Analysis()
    best_result, best_built = run.results.get(best), run.built.get(best)
    analysis.compute = _compute(run, best_result, run.env.cpuFlags)
    ort_best = best_built is not None and isinstance(best_built.runner, OrtRunner) and bench.device == "cpu"
    if ort_best:
        analysis.profiledVariant = best
        analysis.profile = op_time_split(best_built.artifact, random_feed(inputs), bench.threads, 20, run.scratch)
        if analysis.compute:
            rows = layer_efficiency(analysis.compute["byType"], analysis.profile, analysis.compute["measured"],
                                    analysis.compute["atShapes"])
            analysis.compute["byLayer"] = rows
            analysis.compute["otherOpsMs"] = sum(r["ms"] for r in analysis.profile) - sum(r["ms"] for r in rows)
    elif best:
        analysis.notes.append(f"no op-level profile: {best} does not run on ONNX Runtime's CPU provider")
    if bench.scalingBatches and bench.device == "cpu":
        batches = bench.scalingBatches if batchable(inputs) else [inputs[0].shape[0]]
        if not batchable(inputs):
            analysis.notes.append("scaling by batch needs dynamic axis 0 on every input; only the declared batch is shown")
        # A cell takes about batch × the baseline's latency per call × its calls: keep each within half
        # the per-variant time budget (a 257 MB detector at batch 32 would take minutes per cell).
        per_sample_s = run.baseline.latencyMs.mean / 1000 / max(inputs[0].shape[0], 1) if run.baseline.latencyMs else 0
        affordable = [b for b in batches if b * per_sample_s * (bench.scalingRuns + 1) <= bench.timeBudgetSeconds / 2]
        if len(affordable) < len(batches):
            skipped = sorted(set(batches) - set(affordable))
            analysis.notes.append(f"scaling: batch {', '.join(map(str, skipped))} skipped, each cell would take over "
                                  f"half of benchmark.timeBudgetSeconds ({bench.timeBudgetSeconds:g} s)")
            batches = affordable or batches[:1]
        rows = [(BASELINE_NAME if run.loaded.onnx_path is None else run.baseline.name, run.baseline_runner)]
        if best_built:
            rows.append((best, best_built.runner))
        with run.reporter.task("scaling table", len(rows)) as advance:
            for name, runner in rows:
                try:
                    analysis.scaling += scale(name, runner, inputs, batches, bench.scalingThreads, 1, bench.scalingRuns)
                except Exception as error:  # e.g. a compiled PT2E program that inductor cannot recompile at batch 8
                    analysis.notes.append(f"no scaling rows for {name}: {type(error).__name__}: {str(error).strip()[:200]}")
                advance()
    if bench.tune and ort_best:
        with run.reporter.task(f"tuning session options for {best}", 1):
            analysis.tuning = {"variant": best, **tune(best_built.artifact, random_feed(inputs), bench.threads,
                                                       min(bench.warmup, 5), min(bench.runs, 20))}
    elif bench.tune:
        analysis.notes.append("benchmark.tune applies to ONNX Runtime variants on CPU; the best variant is not one")
