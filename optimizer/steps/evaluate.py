"""The evaluate step: fidelity against the FP32 reference, and task accuracy where labels exist."""

from __future__ import annotations

import numpy as np

from optimizer.api.errors import failure_reason
from optimizer.measure.metrics import METRICS
from optimizer.api.results import BASELINE_NAME, Fidelity, VariantResult, VariantStatus
from optimizer.artifacts import onnx_files
from optimizer.engines.runners import Runner
from optimizer.steps.run import Run


def run_all(runner, items: list[dict]) -> list[list[np.ndarray]]:
    return [runner(item) for item in items]


def fidelity(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> Fidelity:
    """Max |Δ| over every output; cosine and argmax agreement (last axis) on the first output."""
    max_abs, agree, total, dots, ref_sq, cand_sq = 0.0, 0, 0, 0.0, 0.0, 0.0
    for ref_outputs, cand_outputs in zip(reference, candidate):
        for ref, cand in zip(ref_outputs, cand_outputs):
            max_abs = max(max_abs, float(np.abs(ref.astype(np.float64) - cand.astype(np.float64)).max(initial=0.0)))
        ref, cand = ref_outputs[0].astype(np.float64), cand_outputs[0].astype(np.float64)
        dots += float((ref * cand).sum())
        ref_sq += float((ref * ref).sum())
        cand_sq += float((cand * cand).sum())
        same = ref.argmax(axis=-1) == cand.argmax(axis=-1)
        agree += int(same.sum())
        total += same.size
    cosine = dots / (np.sqrt(ref_sq * cand_sq) or 1.0)
    return Fidelity(maxAbsDiff=max_abs, cosine=float(cosine), argmaxAgreement=agree / max(total, 1))


def accuracy(metric: str, outputs, labels, fid: Fidelity) -> float:
    """The named metric (optimizer/measure/metrics.py) against labels; "agreement", or no labels: agreement
    with the FP32 model's argmax, already in `fid`."""
    if metric == "agreement" or labels is None:
        return fid.argmaxAgreement
    return METRICS[metric](outputs, labels)


def _baseline_result(run: Run) -> VariantResult:
    """The user's own model as the reference row: PyTorch FP32 (sized as its state_dict) or the ONNX source."""
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


def evaluate_variant(run: Run, result: VariantResult, runner: Runner) -> None:
    """Fidelity against the FP32 reference and accuracy on the run's metric, into `result`."""
    try:
        outputs = run_all(runner, run.dataset.evaluation)
    except Exception as error:  # one variant's failure never stops the others; a bug says so
        result.status, result.error = VariantStatus.failed.value, failure_reason(error, "inference failed")
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
        evaluate_variant(run, run.results[name], built.runner)
