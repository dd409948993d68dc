"""The pipeline: load → data → export → variants → evaluate → fallback → benchmark → select → analyze → report.

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

from optimizer.artifacts import onnx_files
from optimizer.measure import environment, hardware
from optimizer.measure.benchmark import measure_interleaved, round_sizes, speedup_range, steps
from optimizer.api.errors import internal_error
from optimizer.steps.evaluate import accuracy, fidelity, run_all
from optimizer.steps.export import ROUTES, ExportError, ExportResult, export_onnx, random_feed
from optimizer.steps.inputs import check_inputs
from optimizer.steps.load import LoadedModel, load_model
from optimizer.engines import BuildContext, Built, NotApplicable, RecipeFailure, artifact_files, registry
from optimizer.api.results import (
    BASELINE_NAME, Analysis, Fallback, Lineage, Results, StepTiming, VariantResult, VariantStatus, write_json_atomically,
)
from optimizer.run_log import RecordingReporter, collected_warnings
from optimizer.engines.runners import OrtRunner, TorchRunner, check_device, op_counts
from optimizer.steps.select import apply_budget, budget_failure, flag_slow_variants, pick_best, resolve_metric
from optimizer.api.spec import Calibration, ModelOptimization, Recipe, VariantSpec

# compareCalibration expands these; torch.ao's observers are fixed by its qconfig, so not torch's.
CALIBRATED_RECIPES = (Recipe.ort_int8_static.value, Recipe.ort_int8_static_dynamic.value)


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
    input_notes: list[str] = field(default_factory=list)  # what the input check decided, e.g. one shape only
    export_attempts: list[dict] = field(default_factory=list)  # [{route, ok, reason}] in the order tried
    metric: str = "agreement"  # acceptance.metric, resolved against the data
    data_source: str = "random"
    context: BuildContext | None = None
    planned: dict[str, VariantSpec] = field(default_factory=dict)  # by name, compareCalibration expanded
    calibration_of: dict[str, str] = field(default_factory=dict)  # expanded name -> the spec's variant
    reference: list | None = None  # FP32 outputs on the evaluation items
    baseline_runner: object = None
    built: dict[str, Built] = field(default_factory=dict)
    results: dict[str, VariantResult] = field(default_factory=dict)
    baseline: VariantResult | None = None
    env: object = None  # optimizer.api.results.Environment
    hardware: object = None  # optimizer.measure.hardware.HardwareProfile
    best: str | None = None
    best_reason: str = ""
    analysis: Analysis | None = None
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
    run.loaded = load_model(run.spec.spec.model, run.base_dir, run.spec.spec.storage)


def inputs_step(run: Run) -> None:
    """spec.model.inputs against the model itself, before any work (exits 2 on a mismatch)."""
    run.input_notes = check_inputs(run.loaded)


def data_step(run: Run) -> None:
    from optimizer.steps.data import load_dataset

    data = run.spec.spec.data
    source = data.source if "source" in data.model_fields_set else run.loaded.default_data
    run.dataset = load_dataset(source, data.samples, run.loaded.inputs, run.base_dir, data, run.spec.spec.storage)
    run.data_source = source
    run.reporter.log(f"data: {run.dataset.description}")
    labels = run.dataset.labels
    run.metric = resolve_metric(run.spec.spec.acceptance.metric, run.loaded.metric, labels is not None, source,
                                sequence_labels=labels is not None and labels[0].ndim == 2)


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
        run.export_attempts = run.export.attempts
        run.reporter.log(f"exported with {ROUTES[run.export.exporter]}; parity checked at "
                         + " and ".join(str(s) for s in run.export.checked_shapes))
    except ExportError as error:
        run.export_error, run.export_attempts = str(error), error.attempts
        run.reporter.log(f"ONNX export failed: {error}")
    if run.spec.spec.benchmark.device == "cuda":
        run.loaded.module.to("cuda")


def _context(run: Run) -> BuildContext:
    fp32 = run.loaded.onnx_path or (run.export.path if run.export else None)
    return BuildContext(
        loaded=run.loaded, fp32_onnx=fp32, export_error=run.export_error, dataset=run.dataset,
        workdir=run.scratch, threads=run.spec.spec.benchmark.threads, device=run.spec.spec.benchmark.device,
        hardware=run.hardware, reporter=run.reporter, metric=run.metric, data_source=run.data_source,
        acceptance=run.spec.spec.acceptance,
    )


def _has_training_labels(dataset) -> bool:
    return getattr(dataset, "calibration_labels", None) is not None


def planned_variants(run: Run) -> list[VariantSpec]:
    """The spec's variants (or the recommended set), with compareCalibration expanded."""
    variants = list(run.spec.variants())
    if run.spec.spec.variants is None and run.spec.spec.benchmark.device == "cpu" and _has_training_labels(run.dataset):
        # QAT joins the default set only with labelled data: without labels it can only be skipped.
        variants.append(VariantSpec(name=Recipe.torch_int8_qat.value, recipe=Recipe.torch_int8_qat))
    if run.spec.spec.variants is None:  # engines that can win on this CPU class (optimizer/measure/hardware.py)
        variants += [VariantSpec(name=recipe, recipe=recipe) for recipe in run.hardware.default_extras]
    expanded = []
    for variant in variants:
        if not (variant.compareCalibration and variant.recipe in CALIBRATED_RECIPES):
            expanded.append(variant)
            continue
        for method in Calibration:
            copy = variant.model_copy(update={"name": f"{variant.name}-{method.value}", "calibration": method.value,
                                              "compareCalibration": False})
            run.calibration_of[copy.name] = variant.name
            expanded.append(copy)
    return expanded


def _build(ctx: BuildContext, variant: VariantSpec, recipes) -> tuple[VariantResult, Built | None]:
    result = VariantResult(name=variant.name, recipe=variant.recipe, status=VariantStatus.ok)
    try:
        built = recipes[variant.recipe](ctx, variant)
    except NotApplicable as reason:
        result.status, result.error = VariantStatus.skipped.value, str(reason)
        return result, None
    except RecipeFailure as error:  # the message says what the user can do about it
        result.status, result.error = VariantStatus.failed.value, str(error).strip()[:800]
        return result, None
    except Exception as error:  # one failing variant never stops the others; this one is our bug
        result.status, result.error = VariantStatus.failed.value, internal_error(error)
        return result, None
    return result, built


def _keep(variant: VariantSpec, result: VariantResult, built: Built, models_dir: Path) -> None:
    """Move the variant's model into models/ and record what it is."""
    artifact = models_dir / f"{variant.name}{built.artifact.suffix}"
    if artifact.suffix == ".onnx":
        onnx_files.move(built.artifact, artifact)  # external data keeps its names: the graph refers to them
    else:
        for source, target in zip(artifact_files(built.artifact), artifact_files(artifact)):
            shutil.move(source, target)  # OpenVINO finds <name>.bin beside <name>.xml
    result.artifactFiles = [f"models/{p.name}" for p in artifact_files(artifact)[1:]]
    built.artifact = artifact
    if hasattr(built.runner, "path"):
        built.runner.path = artifact  # later sessions (scaling, profiling) load it from here
    result.runtime, result.provider = built.runner.runtime, built.runner.provider
    result.sizeBytes, result.artifact = built.size_bytes, f"models/{artifact.name}"
    result.lineage = Lineage(parent=built.parent, recipe=variant.recipe, options=built.options)
    result.notes = list(built.notes)
    optimized = getattr(built.runner, "optimized_path", None)
    if optimized and optimized.exists():
        result.opCounts = op_counts(optimized)


def _build_one(ctx: BuildContext, variant: VariantSpec, recipes, models_dir: Path) -> tuple[VariantResult, Built | None]:
    result, built = _build(ctx, variant, recipes)
    if built:
        _keep(variant, result, built, models_dir)
    return result, built


def variants_step(run: Run) -> None:
    run.context, recipes = _context(run), registry()
    ctx, models_dir = run.context, run.staging / "models"
    models_dir.mkdir()
    variants = planned_variants(run)
    for index, variant in enumerate(variants, 1):
        run.reporter.log(f"[{index}/{len(variants)}] building {variant.name} ({variant.recipe})")
        run.planned[variant.name] = variant
        result, built = _build_one(ctx, variant, recipes, models_dir)
        result.calibrationOf = run.calibration_of.get(variant.name)
        if variant.compareCalibration and variant.recipe not in CALIBRATED_RECIPES:
            result.notes.append("compareCalibration applies to the ORT static recipes (torch.ao's observers are "
                                "set by its qconfig); built once")
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
        size, recipe = onnx_files.total_size(run.loaded.onnx_path), "onnx-source"
    else:
        import torch

        path = run.scratch / "baseline.pt"
        torch.save(run.loaded.module.state_dict(), path)
        size, recipe = path.stat().st_size, BASELINE_NAME
    runner = run.baseline_runner
    return VariantResult(name=BASELINE_NAME if recipe == BASELINE_NAME else "onnx-source-fp32", recipe=recipe,
                         status=VariantStatus.ok, runtime=runner.runtime, provider=runner.provider, sizeBytes=size)


def _evaluate(run: Run, result: VariantResult, runner) -> None:
    try:
        outputs = run_all(runner, run.dataset.evaluation)
    except Exception as error:
        result.status, result.error = VariantStatus.failed.value, f"inference failed: {str(error)[:300]}"
        return
    result.fidelity = fidelity(run.reference, outputs)
    result.accuracy = accuracy(run.metric, outputs, run.dataset.labels, result.fidelity)


def evaluate_step(run: Run) -> None:
    items, labels = run.dataset.evaluation, run.dataset.labels
    run.baseline = _baseline_result(run)
    with run.reporter.task("evaluating FP32 reference", len(items)):
        run.reference = run_all(run.baseline_runner, items)
    run.baseline.fidelity = fidelity(run.reference, run.reference)
    run.baseline.accuracy = accuracy(run.metric, run.reference, labels, run.baseline.fidelity)
    for name, built in run.built.items():
        _evaluate(run, run.results[name], built.runner)


def _budget_failure(run: Run, value: float) -> str | None:
    acceptance = run.spec.spec.acceptance
    return budget_failure(value, run.baseline.accuracy, acceptance.maxAccuracyDrop,
                          acceptance.maxRelativeAccuracyDrop, run.metric)


def _needs_fallback(run: Run, name: str) -> bool:
    from optimizer.steps.fallback import RECIPES

    result = run.results[name]
    return (result.recipe in RECIPES and result.status == VariantStatus.ok.value and result.accuracy is not None
            and run.baseline.accuracy is not None and _budget_failure(run, result.accuracy) is not None)


def fallback_step(run: Run) -> None:
    """Retry each ORT static variant that misses the budget with its most sensitive nodes in FP32."""
    from optimizer.steps.fallback import Attempt, recover
    from optimizer.engines.ort import preprocessed

    if not run.spec.spec.acceptance.fallback:
        return
    recipes, models_dir = registry(), run.staging / "models"
    scratch = run.scratch / "fallback"

    def score(built: Built) -> float:
        probe = VariantResult(name="probe", recipe="probe", status=VariantStatus.ok)
        _evaluate(run, probe, built.runner)
        return probe.accuracy if probe.accuracy is not None else float("-inf")

    attempt = Attempt(build=lambda spec: _build(run.context, spec, recipes), accuracy=score,
                      budget_failure=lambda value: _budget_failure(run, value))
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
        except Exception as error:  # the analysis never costs the run its other results
            record, recovered, built = Fallback(reason=f"sensitivity analysis failed: {type(error).__name__}: "
                                                       f"{str(error).strip()[:300]}"), None, None
        result.fallback = record
        if built is None:
            run.reporter.log(f"{name}: fallback did not recover it ({record.reason})")
            continue
        spec = run.planned[name].model_copy(update={
            "name": record.variant, "excludeNodes": [*run.planned[name].excludeNodes, *record.excludedNodes]})
        _keep(spec, recovered, built, models_dir)
        recovered.lineage.parent = name
        recovered.calibrationOf = result.calibrationOf
        recovered.notes.append(f"the accuracy fallback kept {len(record.excludedNodes)} node(s) of {name} in FP32: "
                               + ", ".join(record.excludedNodes))
        _evaluate(run, recovered, built.runner)
        run.planned[spec.name], run.built[spec.name], ordered[spec.name] = spec, built, recovered
        run.reporter.log(f"{name}: recovered as {spec.name} ({len(record.excludedNodes)} node(s) in FP32)")
    run.results = ordered


def benchmark_step(run: Run) -> None:
    bench = run.spec.spec.benchmark
    feed = random_feed(run.loaded.inputs)  # one input, shared by every variant
    timed = [(run.baseline, run.baseline_runner)] + [
        (run.results[n], b.runner) for n, b in run.built.items() if run.results[n].status == VariantStatus.ok.value
    ]
    # Keyed by position: a variant may carry the baseline's name.
    calls = {index: runner.bind(feed) for index, (_, runner) in enumerate(timed)}
    rounds = len(round_sizes(bench.runs, bench.rounds))
    with run.reporter.task(f"timing {len(calls)} models in {rounds} interleaved round(s)",
                           steps(len(calls), bench.warmup, bench.runs, bench.rounds)) as advance:
        latencies = measure_interleaved(calls, bench.warmup, bench.runs, bench.rounds, advance)
    for index, (result, _) in enumerate(timed):
        result.latencyMs = latencies[index]
        result.speedup = run.baseline.latencyMs.mean / result.latencyMs.mean
        result.speedupRange = speedup_range(run.baseline.latencyMs, result.latencyMs)
        run.reporter.log(f"{result.name}: {result.latencyMs.mean:.2f} ± {result.latencyMs.std:.2f} ms")


def select_step(run: Run) -> None:
    acceptance = run.spec.spec.acceptance
    variants = list(run.results.values())
    for variant in variants:
        apply_budget(variant, run.baseline, acceptance.maxAccuracyDrop, run.metric, acceptance.maxRelativeAccuracyDrop)
        if variant.fallback and variant.fallback.recovered:
            variant.notes.append(f"the accuracy fallback recovered it as {variant.fallback.variant}")
    flag_slow_variants(variants, run.baseline, run.env.cpuFlags)
    run.best, run.best_reason = pick_best(variants, run.baseline)


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


def _model_record(run: Run) -> dict:
    record = {"source": run.loaded.source, "format": run.loaded.format,
              "inputs": [spec.model_dump(mode="json") for spec in run.loaded.inputs]}
    if run.input_notes:
        record["inputNotes"] = run.input_notes
    if run.export:
        record.update(exporter=run.export.exporter, opset=run.spec.spec.export.opset,
                      parityShapes=run.export.checked_shapes)
    elif run.export_error:
        record["exportError"] = run.export_error
    if run.export_attempts:
        record["exportAttempts"] = run.export_attempts  # every route tried, in order, with why it failed
    return record


def _publish(staging: Path, output: Path, results: Results) -> None:
    """Move everything into the output directory; results.json goes last, atomically."""
    from optimizer.artifacts.storage import describe_outputs

    output.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging / "scratch", ignore_errors=True)
    results.outputs = describe_outputs(staging)  # so a reader can verify every file it downloads
    for item in sorted(staging.iterdir()):
        target = output / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    write_json_atomically(output / "results.json", results.model_dump(mode="json"))


# The pipeline, in order; each step reads and fills the Run. `report` runs last, in optimize().
STEPS = [
    ("load", load_step),
    ("inputs", inputs_step),
    ("data", data_step),
    ("export", export_step),
    ("variants", variants_step),
    ("evaluate", evaluate_step),
    ("fallback", fallback_step),
    ("benchmark", benchmark_step),
    ("select", select_step),
    ("analyze", analyze_step),
]


def optimize(spec: ModelOptimization, output: Path, base_dir: Path, reporter) -> Results:
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    reporter = RecordingReporter(reporter)
    try:
        run = Run(spec=spec, base_dir=base_dir, staging=staging, reporter=reporter)
        run.scratch.mkdir()
        check_device(spec.spec.benchmark.device)
        run.env = environment.describe(spec.spec.benchmark.threads, spec.spec.benchmark.device)
        run.hardware = hardware.resolve(spec.spec.benchmark.profile, run.env.cpuFlags, spec.spec.benchmark.device)
        run.env.hardware = run.hardware.record()
        reporter.log(f"hardware profile: {run.hardware.isa} ({run.hardware.chosen_by}); {run.hardware.reasons[-1]}")
        _configure_threads(spec.spec.benchmark.threads)
        with collected_warnings() as library_warnings:
            for name, step in STEPS:
                with _timed(run, name):
                    step(run)
        if library_warnings:
            reporter.log(f"{len(library_warnings)} distinct warning(s) from the libraries: see report.md or run.log")
        results = Results(
            name=spec.metadata.name, model=_model_record(run), accuracyMetric=run.metric,
            accuracyBudget={"maxAccuracyDrop": spec.spec.acceptance.maxAccuracyDrop,
                            "maxRelativeAccuracyDrop": spec.spec.acceptance.maxRelativeAccuracyDrop},
            dataset=run.dataset.description,
            baseline=run.baseline, variants=list(run.results.values()), best=run.best, bestReason=run.best_reason,
            environment=run.env, analysis=run.analysis, steps=run.steps, warnings=library_warnings,
        )
        with _timed(run, "report"):
            from optimizer.steps.report import write_report

            write_report(results, staging)
        results.steps = run.steps
        (staging / "run.log").write_text("\n".join([*reporter.lines, "", "warnings from the libraries:",
                                                    *(library_warnings or ["none"])]) + "\n")
        _publish(staging, output, results)
        return results
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _configure_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
