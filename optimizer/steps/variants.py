"""Variants: build every planned variant with its recipe (optimizer/engines) and keep its model.

A failing recipe never stops the others: NotApplicable is `skipped`, RecipeFailure `failed` with
the recipe's own message, anything else `failed` as an mlopt bug with where it happened.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from optimizer.api.errors import DeviceError, internal_error
from optimizer.api.results import Lineage, VariantResult, VariantStatus
from optimizer.api.spec import Calibration, Recipe, VariantSpec
from optimizer.artifacts import onnx_files
from optimizer.engines import (
    CALIBRATED_RECIPES, BuildContext, Built, NotApplicable, RecipeFailure, artifact_files, registry,
)
from optimizer.engines.runners import op_counts
from optimizer.measure.memory import peak_memory
from optimizer.api.units import format_size
from optimizer.steps.run import Run



def build_context(run: Run) -> BuildContext:
    fp32 = run.loaded.onnx_path or (run.export.path if run.export else None)
    return BuildContext(
        loaded=run.loaded, fp32_onnx=fp32, export_error=run.export_error, dataset=run.dataset,
        workdir=run.scratch, threads=run.spec.spec.benchmark.threads, device=run.spec.spec.benchmark.device,
        hardware=run.hardware, reporter=run.reporter, metric=run.metric, data_source=run.data_source,
        acceptance=run.spec.spec.acceptance,
    )


def planned_variants(run: Run) -> list[VariantSpec]:
    """The spec's variants (or the recommended set), with compareCalibration expanded."""
    variants = list(run.spec.variants())
    default_set = run.spec.spec.variants is None
    if default_set and run.spec.spec.benchmark.device == "cpu" and run.dataset.calibration_labels is not None \
            and run.dataset.boxes is None:  # labelled boxes would need a detection loss
        # QAT joins the default set only with labelled data: without labels it can only be skipped.
        variants.append(VariantSpec(name=Recipe.torch_int8_qat.value, recipe=Recipe.torch_int8_qat))
    if default_set:  # engines that can win on this CPU class (optimizer/measure/hardware.py)
        variants += [VariantSpec(name=recipe, recipe=recipe) for recipe in run.hardware.default_extras]
    if default_set and run.spec.spec.benchmark.device == "cpu" and _unquantizable_activations(run):
        # ONNX Runtime's quantizer leaves Mish (Softplus/Tanh) in FP32 between DequantizeLinear and
        # QuantizeLinear; OpenVINO fuses Mish into its INT8 convolutions. Measured, not assumed: it
        # joins the set and wins or loses on its latency like every other variant.
        known = {variant.recipe for variant in variants}
        variants += [VariantSpec(name=recipe.value, recipe=recipe) for recipe in (Recipe.openvino_int8,)
                     if recipe.value not in known]
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


UNQUANTIZABLE_ACTIVATIONS = ("Mish", "Softplus")  # no QDQ kernel in ONNX Runtime's quantizer registry


def _unquantizable_activations(run: Run) -> bool:
    fp32 = run.loaded.onnx_path or (run.export.path if run.export else None)
    return fp32 is not None and any(op in op_counts(fp32) for op in UNQUANTIZABLE_ACTIVATIONS)


def build_variant(ctx: BuildContext, variant: VariantSpec, recipes) -> tuple[VariantResult, Built | None]:
    """One recipe run: its result record, and what it built (None when skipped or failed)."""
    result = VariantResult(name=variant.name, recipe=variant.recipe, status=VariantStatus.ok)
    try:
        built = recipes[variant.recipe](ctx, variant)
    except NotApplicable as reason:
        result.status, result.error = VariantStatus.skipped.value, str(reason)
        return result, None
    except (RecipeFailure, DeviceError) as error:  # the message says what the user can do about it
        # DeviceError: e.g. ONNX Runtime without its CUDA provider, or nodes it ran on the CPU instead:
        # a failure of this variant with the reason, never timed as a GPU variant.
        result.status, result.error = VariantStatus.failed.value, str(error).strip()[:800]
        return result, None
    except Exception as error:  # one failing variant never stops the others; this one is our bug
        result.status, result.error = VariantStatus.failed.value, internal_error(error)
        return result, None
    return result, built


def keep_variant(variant: VariantSpec, result: VariantResult, built: Built, models_dir: Path) -> None:
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
    if getattr(built.runner, "placement_note", None):  # ONNX Runtime on CUDA: where its nodes ran
        result.notes.append(built.runner.placement_note)
    optimized = getattr(built.runner, "optimized_path", None)
    if optimized and optimized.exists():
        result.opCounts = op_counts(optimized)


def variants_step(run: Run) -> None:
    run.context, recipes = build_context(run), registry()
    models_dir = run.staging / "models"
    models_dir.mkdir()
    for path in run.loaded.carried_files:  # a Hugging Face folder's config and tokenizer, beside every variant
        shutil.copyfile(path, models_dir / path.name)
    variants = planned_variants(run)
    for index, variant in enumerate(variants, 1):
        run.reporter.log(f"[{index}/{len(variants)}] building {variant.name} ({variant.recipe})")
        run.planned[variant.name] = variant
        started = time.perf_counter()
        with peak_memory() as peak:
            result, built = build_variant(run.context, variant, recipes)
        result.peakMemoryBytes = peak.added_bytes
        if built:
            keep_variant(variant, result, built, models_dir)
            run.reporter.log(f"{variant.name}: built in {time.perf_counter() - started:.1f} s, "
                             f"{format_size(result.sizeBytes)}, peak memory +{format_size(peak.added_bytes)}")
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
