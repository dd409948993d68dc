"""The pipeline: load → data → export → variants → evaluate → benchmark → select → analyze → report.

Each step is a small function; `optimize` runs them in order and times each. The CLI, the Job's
worker and the tests all call `optimize`. Everything is written to a staging directory beside the
output and moved into place at the end, results.json last, so an interrupted run leaves no
half-written results.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from optimizer import environment
from optimizer.benchmark import measure
from optimizer.evaluate import accuracy, fidelity, run_all
from optimizer.export import ExportError, ExportResult, export_onnx, random_feed
from optimizer.load import LoadedModel, load_model
from optimizer.recipes import BuildContext, Built, NotApplicable, registry
from optimizer.results import (
    BASELINE_NAME, Analysis, Lineage, Results, StepTiming, VariantResult, VariantStatus, write_json_atomically,
)
from optimizer.runtime import OrtRunner, TorchRunner, check_device, op_counts
from optimizer.selection import apply_budget, flag_slow_variants, pick_best
from optimizer.spec import ModelOptimization, VariantSpec


@dataclass
class Run:
    """What the steps hand to each other."""

    spec: ModelOptimization
    base_dir: Path
    staging: Path
    reporter: object
    loaded: LoadedModel | None = None
    dataset: object = None
    export: ExportResult | None = None
    export_error: str | None = None
    baseline_runner: object = None
    built: dict[str, Built] = field(default_factory=dict)
    results: dict[str, VariantResult] = field(default_factory=dict)
    baseline: VariantResult | None = None
    steps: list[StepTiming] = field(default_factory=list)

    @property
    def scratch(self) -> Path:
        return self.staging / "scratch"


@contextmanager
def _timed(run: Run, step: str):
    start = time.perf_counter()
    run.reporter.log(f"{step}…")
    yield
    run.steps.append(StepTiming(step=step, seconds=round(time.perf_counter() - start, 3)))


def load_step(run: Run) -> None:
    run.loaded = load_model(run.spec.spec.model, run.base_dir)


def data_step(run: Run) -> None:
    from optimizer.data import load_dataset

    data = run.spec.spec.data
    source = data.source if "source" in data.model_fields_set else run.loaded.default_data
    run.dataset = load_dataset(source, data.samples, run.loaded.inputs, run.base_dir)
    run.reporter.log(f"data: {run.dataset.description}")


def export_step(run: Run) -> None:
    threads = run.spec.spec.benchmark.threads
    if run.loaded.onnx_path is not None:
        run.baseline_runner = OrtRunner(run.loaded.onnx_path, threads=threads, device=run.spec.spec.benchmark.device)
        return
    names = [spec.name for spec in run.loaded.inputs]
    run.baseline_runner = TorchRunner(run.loaded.module, names, device=run.spec.spec.benchmark.device)
    cpu_reference = TorchRunner(run.loaded.module, names)
    try:
        run.export = export_onnx(cpu_reference, run.loaded.inputs, run.spec.spec.export, run.scratch, threads)
        run.reporter.log(f"exported with the {run.export.exporter} exporter; parity checked at "
                         + " and ".join(str(s) for s in run.export.checked_shapes))
    except ExportError as error:
        run.export_error = str(error)
        run.reporter.log(f"ONNX export failed: {error}")
    if run.spec.spec.benchmark.device == "cuda":
        run.loaded.module.to("cuda")


def _context(run: Run, cpu_flags: list[str]) -> BuildContext:
    fp32 = run.loaded.onnx_path or (run.export.path if run.export else None)
    return BuildContext(
        loaded=run.loaded, fp32_onnx=fp32, export_error=run.export_error, dataset=run.dataset,
        workdir=run.scratch, threads=run.spec.spec.benchmark.threads, device=run.spec.spec.benchmark.device,
        cpu_flags=frozenset(cpu_flags), reporter=run.reporter,
    )


def _build_one(ctx: BuildContext, variant: VariantSpec, recipes, models_dir: Path) -> tuple[VariantResult, Built | None]:
    result = VariantResult(name=variant.name, recipe=variant.recipe, status=VariantStatus.ok)
    try:
        built = recipes[variant.recipe](ctx, variant)
    except NotApplicable as reason:
        result.status, result.error = VariantStatus.skipped.value, str(reason)
        return result, None
    except Exception as error:  # one failing variant never stops the others
        result.status = VariantStatus.failed.value
        result.error = f"{type(error).__name__}: {str(error).strip()[:500]}"
        return result, None
    artifact = models_dir / f"{variant.name}{built.artifact.suffix}"
    shutil.move(built.artifact, artifact)
    built.artifact = artifact
    if isinstance(built.runner, OrtRunner):
        built.runner.path = artifact  # later sessions (scaling, profiling) load it from here
    result.runtime, result.provider = built.runner.runtime, built.runner.provider
    result.sizeBytes, result.artifact = built.size_bytes, f"models/{artifact.name}"
    result.lineage = Lineage(parent=built.parent, recipe=variant.recipe, options=built.options)
    result.notes = list(built.notes)
    optimized = getattr(built.runner, "optimized_path", None)
    if optimized and optimized.exists():
        result.opCounts = op_counts(optimized)
    return result, built


def variants_step(run: Run, cpu_flags: list[str]) -> None:
    ctx, recipes = _context(run, cpu_flags), registry()
    models_dir = run.staging / "models"
    models_dir.mkdir()
    variants = run.spec.variants()
    for index, variant in enumerate(variants, 1):
        run.reporter.log(f"[{index}/{len(variants)}] building {variant.name} ({variant.recipe})")
        result, built = _build_one(ctx, variant, recipes, models_dir)
        if run.export and variant.recipe == "onnx-fp32" and built:
            result.notes.extend(run.export.notes)
            result.lineage.options.update(exporter=run.export.exporter, opset=run.spec.spec.export.opset)
        if result.status == VariantStatus.failed.value:
            run.reporter.log(f"{variant.name} failed: {result.error}")
        run.results[variant.name] = result
        if built:
            run.built[variant.name] = built


def _baseline_result(run: Run) -> VariantResult:
    if run.loaded.onnx_path is not None:
        size, recipe = run.loaded.onnx_path.stat().st_size, "onnx-source"
    else:
        import torch

        path = run.scratch / "baseline.pt"
        torch.save(run.loaded.module.state_dict(), path)
        size, recipe = path.stat().st_size, BASELINE_NAME
    runner = run.baseline_runner
    return VariantResult(name=BASELINE_NAME if recipe == BASELINE_NAME else "onnx-source-fp32", recipe=recipe,
                         status=VariantStatus.ok, runtime=runner.runtime, provider=runner.provider, sizeBytes=size)


def evaluate_step(run: Run) -> None:
    items, labels = run.dataset.evaluation, run.dataset.labels
    metric = run.loaded.metric if labels is not None else "agreement"
    run.baseline = _baseline_result(run)
    with run.reporter.task("evaluating FP32 reference", len(items)):
        reference = run_all(run.baseline_runner, items)
    run.baseline.fidelity = fidelity(reference, reference)
    run.baseline.accuracy = accuracy(metric, reference, labels, run.baseline.fidelity)
    for name, built in run.built.items():
        result = run.results[name]
        try:
            outputs = run_all(built.runner, items)
        except Exception as error:
            result.status, result.error = VariantStatus.failed.value, f"inference failed: {str(error)[:300]}"
            continue
        result.fidelity = fidelity(reference, outputs)
        result.accuracy = accuracy(metric, outputs, labels, result.fidelity)


def benchmark_step(run: Run) -> None:
    bench = run.spec.spec.benchmark
    feed = random_feed(run.loaded.inputs)  # one input, shared by every variant
    timed = [(run.baseline, run.baseline_runner)] + [
        (run.results[n], b.runner) for n, b in run.built.items() if run.results[n].status == VariantStatus.ok.value
    ]
    for result, runner in timed:
        with run.reporter.task(f"timing {result.name}", bench.warmup + bench.runs) as advance:
            result.latencyMs = measure(runner.bind(feed), bench.warmup, bench.runs, advance)
        run.reporter.log(f"{result.name}: {result.latencyMs.mean:.2f} ± {result.latencyMs.std:.2f} ms")
    for result, _ in timed:
        result.speedup = run.baseline.latencyMs.mean / result.latencyMs.mean


def select_step(run: Run, cpu_flags: list[str]) -> tuple[str | None, str]:
    metric = run.loaded.metric if run.dataset.labels is not None else "agreement"
    variants = list(run.results.values())
    for variant in variants:
        apply_budget(variant, run.baseline, run.spec.spec.acceptance.maxAccuracyDrop, metric)
    flag_slow_variants(variants, run.baseline, cpu_flags)
    return pick_best(variants, run.baseline)


def _compute(run: Run, best: VariantResult | None, flags: list[str]) -> dict | None:
    from optimizer.compute import clock_ghz, compute_limits, count_macs

    if not run.loaded.is_eager or run.spec.spec.benchmark.device != "cpu":
        return None  # hooks need the Python module, on the CPU
    by_type = count_macs(run.loaded.module, random_feed(run.loaded.inputs), [s.name for s in run.loaded.inputs])
    if not by_type:
        return None
    limits = compute_limits(sum(by_type.values()), flags, clock_ghz())
    limits["byType"] = by_type
    if best and best.latencyMs:
        limit = limits["int8LimitMs"] if "int8" in best.recipe else limits["fp32LimitMs"]
        limits["bestFractionOfLimit"] = limit / best.latencyMs.mean if limit else None
    return limits


def analyze_step(run: Run, best: str | None, flags: list[str]) -> Analysis:
    """Explain the pick: arithmetic vs the machine's limit, time per op type, scaling, tuning."""
    from optimizer.profiling import op_time_split
    from optimizer.scaling import batchable, scale
    from optimizer.tuning import tune

    bench, inputs = run.spec.spec.benchmark, run.loaded.inputs
    analysis = Analysis()
    best_result, best_built = run.results.get(best), run.built.get(best)
    analysis.compute = _compute(run, best_result, flags)
    ort_best = best_built is not None and isinstance(best_built.runner, OrtRunner) and bench.device == "cpu"
    if ort_best:
        analysis.profiledVariant = best
        analysis.profile = op_time_split(best_built.artifact, random_feed(inputs), bench.threads, 20, run.scratch)
    elif best:
        analysis.notes.append(f"no op-level profile: {best} does not run on ONNX Runtime's CPU provider")
    if bench.scalingBatches and bench.device == "cpu":
        batches = bench.scalingBatches if batchable(inputs) else [inputs[0].shape[0]]
        if not batchable(inputs):
            analysis.notes.append("scaling by batch needs dynamic axis 0 on every input; only the declared batch is shown")
        rows = [(BASELINE_NAME if run.loaded.onnx_path is None else run.baseline.name, run.baseline_runner)]
        if best_built:
            rows.append((best, best_built.runner))
        with run.reporter.task("scaling table", len(rows)) as advance:
            for name, runner in rows:
                analysis.scaling += scale(name, runner, inputs, batches, bench.scalingThreads, 1, bench.scalingRuns)
                advance()
    if bench.tune and ort_best:
        with run.reporter.task(f"tuning session options for {best}", 1):
            analysis.tuning = {"variant": best, **tune(best_built.artifact, random_feed(inputs), bench.threads,
                                                       min(bench.warmup, 5), min(bench.runs, 20))}
    elif bench.tune:
        analysis.notes.append("benchmark.tune applies to ONNX Runtime variants on CPU; the best variant is not one")
    return analysis


def _model_record(run: Run) -> dict:
    record = {"source": run.loaded.source, "format": run.loaded.format,
              "inputs": [spec.model_dump(mode="json") for spec in run.loaded.inputs]}
    if run.export:
        record.update(exporter=run.export.exporter, opset=run.spec.spec.export.opset,
                      parityShapes=run.export.checked_shapes)
    elif run.export_error:
        record["exportError"] = run.export_error
    return record


def _publish(staging: Path, output: Path, results: Results) -> None:
    """Move everything into the output directory; results.json goes last, atomically."""
    output.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging / "scratch", ignore_errors=True)
    for item in sorted(staging.iterdir()):
        target = output / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    write_json_atomically(output / "results.json", results.model_dump(mode="json"))


def optimize(spec: ModelOptimization, output: Path, base_dir: Path, reporter) -> Results:
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        run = Run(spec=spec, base_dir=base_dir, staging=staging, reporter=reporter)
        run.scratch.mkdir()
        check_device(spec.spec.benchmark.device)
        env = environment.describe(spec.spec.benchmark.threads, spec.spec.benchmark.device)
        _configure_threads(spec.spec.benchmark.threads)
        with _timed(run, "load"):
            load_step(run)
        with _timed(run, "data"):
            data_step(run)
        with _timed(run, "export"):
            export_step(run)
        with _timed(run, "variants"):
            variants_step(run, env.cpuFlags)
        with _timed(run, "evaluate"):
            evaluate_step(run)
        with _timed(run, "benchmark"):
            benchmark_step(run)
        with _timed(run, "select"):
            best, reason = select_step(run, env.cpuFlags)
        with _timed(run, "analyze"):
            analysis = analyze_step(run, best, env.cpuFlags)
        results = Results(
            name=spec.metadata.name, model=_model_record(run), accuracyMetric=run.loaded.metric
            if run.dataset.labels is not None else "agreement", dataset=run.dataset.description,
            baseline=run.baseline, variants=list(run.results.values()), best=best, bestReason=reason,
            environment=env, analysis=analysis, steps=run.steps,
        )
        with _timed(run, "report"):
            from optimizer.report import write_report

            write_report(results, staging)
        results.steps = run.steps
        _publish(staging, output, results)
        return results
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _configure_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
