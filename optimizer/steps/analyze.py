"""Analyze: explain the pick. The model's arithmetic against this machine's limits, where the best
variant's time goes by op type, a scaling table by batch and threads, and optional session tuning."""

from __future__ import annotations

from optimizer.api.results import BASELINE_NAME, Analysis, VariantResult
from optimizer.engines.runners import OpenVinoRunner, OrtRunner
from optimizer.engines.feeds import random_feed
from optimizer.measure.limits import Best, Candidate
from optimizer.measure.openvino_kernels import OpenVinoKernels, openvino_kernels, runtime_precision
from optimizer.steps.run import Run


def _best(run: Run, best: VariantResult | None) -> Best | None:
    """The best variant as the limits see it: its precision is read from what it runs (ONNX Runtime's
    kernels in limits.py; OpenVINO's executed graph here), otherwise from its recipe."""
    if best is None or best.latencyMs is None:
        return None
    built = run.built.get(best.name)
    provider = best.provider or ""
    precision = "int8" if "int8" in best.recipe else "bf16" if "bf16" in provider or "f16" in provider else "fp32"
    if built and isinstance(built.runner, OpenVinoRunner):
        precision = runtime_precision(built.runner.compiled)  # openvino-ort-qdq runs INT8 whatever its name
    call = built.runner.bind(random_feed(run.loaded.inputs)) if built else None
    return Best(best.name, precision, best.runtime == "onnxruntime", best.latencyMs.mean, call)


def _candidates(run: Run) -> list[Candidate]:
    """The ONNX Runtime variants that were timed, with the graph ORT optimized for each."""
    found = []
    for name, built in run.built.items():
        optimized = getattr(built.runner, "optimized_path", None)
        if isinstance(built.runner, OrtRunner) and optimized and optimized.exists() and run.results[name].latencyMs:
            found.append(Candidate(name, optimized))
    return found


def _openvino(run: Run, best: Best | None, notes: list[str]) -> OpenVinoKernels | None:
    """The best variant's own OpenVINO compute nodes, profiled, when it runs on OpenVINO."""
    built = run.built.get(best.name) if best else None
    if not (built and isinstance(built.runner, OpenVinoRunner)):
        return None
    try:
        return openvino_kernels(best.name, built.runner, random_feed(run.loaded.inputs), best.mean_ms)
    except Exception as error:  # e.g. a plugin without performance counters: no OpenVINO at-shape line
        notes.append(f"OpenVINO's kernels not timed for {best.name}: {type(error).__name__}: {str(error).strip()[:200]}")
        return None


def _compute(run: Run, best: VariantResult | None, flags: list[str]) -> dict | None:
    from optimizer.measure.compute import count_products, macs_by_type
    from optimizer.measure.hardware import isa_class
    from optimizer.measure.limits import measure_limits

    if not run.loaded.is_eager or run.spec.spec.benchmark.device != "cpu":
        return None  # hooks need the Python module, on the CPU
    products = count_products(run.loaded.module, random_feed(run.loaded.inputs), [s.name for s in run.loaded.inputs])
    if not products:
        return None
    by_type = macs_by_type(products)
    macs = sum(by_type.values())
    limit_best, notes = _best(run, best), []
    with run.reporter.task("measuring the limits (kernels alone, peak, clock) until stable", 1):
        limits = measure_limits(macs, by_type, _candidates(run), random_feed(run.loaded.inputs),
                                run.spec.spec.benchmark.threads, isa_class(flags), limit_best,
                                _openvino(run, limit_best, notes))
    limits["notes"] += notes
    return {"macs": macs, "byType": by_type, **limits}


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
            compute = analysis.compute
            rows = layer_efficiency(compute["byType"], analysis.profile, compute["peak"], compute["atShapes"],
                                    compute.get("best", {}).get("precision"))
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
        rows = [(BASELINE_NAME if run.loaded.onnx_path is None else run.baseline.name, run.baseline_runner, run.baseline)]
        if best_built:
            rows.append((best, best_built.runner, best_result))
        with run.reporter.task("scaling table", len(rows)) as advance:
            for name, runner, result in rows:
                # The benchmark's own cell is its measured mean: one number for one thing.
                known = {(inputs[0].shape[0], bench.threads): result.latencyMs.mean} if result.latencyMs else {}
                try:
                    analysis.scaling += scale(name, runner, inputs, batches, bench.scalingThreads, 1, bench.scalingRuns,
                                              known)
                except Exception as error:  # e.g. a compiled PT2E program that inductor cannot recompile at batch 8
                    analysis.notes.append(f"no scaling rows for {name}: {type(error).__name__}: {str(error).strip()[:200]}")
                advance()
    if bench.tune and ort_best:
        with run.reporter.task(f"tuning session options for {best}", 1):
            analysis.tuning = {"variant": best, **tune(best_built.artifact, random_feed(inputs), bench.threads,
                                                       min(bench.warmup, 5), min(bench.runs, 20))}
    elif bench.tune:
        analysis.notes.append("benchmark.tune applies to ONNX Runtime variants on CPU; the best variant is not one")
