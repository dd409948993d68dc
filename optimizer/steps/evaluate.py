"""Step 6, evaluate: fidelity against the FP32 reference, and task accuracy where labels exist."""

from __future__ import annotations

import numpy as np

from optimizer.measure.metrics import METRICS
from optimizer.api.results import Fidelity


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
