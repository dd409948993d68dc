"""Accuracy metrics on hand-made outputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from optimizer.steps.evaluate import accuracy
from optimizer.api.spec import ACCURACY_METRICS
from optimizer.api.units import METRIC_LABELS
from optimizer.measure.metrics import METRICS, agreement, cer, char_accuracy, edit_distance, exact_match, top1
from optimizer.api.results import Fidelity
from optimizer.zoo.textlines import encode, pad_labels


def _ctc_scores(texts: list[str]) -> np.ndarray:
    """(time, batch, 42) scores whose greedy CTC decoding gives `texts` (blank after each symbol)."""
    time = 2 * max(len(text) for text in texts) + 1
    scores = np.zeros((time, len(texts), 42), dtype=np.float32)
    scores[:, :, 0] = 1.0  # blank everywhere ...
    for column, text in enumerate(texts):
        for index, symbol in enumerate(encode(text)):
            scores[2 * index, column, symbol] = 2.0  # ... except one step per symbol
    return scores


@pytest.mark.parametrize("reference, hypothesis, distance", [
    ("abc", "abd", 1), ("abc", "abc", 0), ("", "ab", 2), ("abc", "", 3), ("kitten", "sitting", 3),
    ("abc", "acb", 2),
])
def test_edit_distance(reference, hypothesis, distance):
    assert edit_distance(reference, hypothesis) == distance


def test_cer_is_total_edits_over_total_reference_characters():
    outputs = [[_ctc_scores(["abd", "hello"])]]
    labels = [pad_labels(["abc", "hello"])]
    assert cer(outputs, labels) == pytest.approx(1 / 8)
    assert char_accuracy(outputs, labels) == pytest.approx(7 / 8)
    assert exact_match(outputs, labels) == pytest.approx(1 / 2)


def test_text_metrics_pool_over_items():
    outputs = [[_ctc_scores(["abd"])], [_ctc_scores(["xyz12"])]]
    labels = [pad_labels(["abc"]), pad_labels(["xyz"])]  # 1 substitution + 2 insertions over 6 chars
    assert cer(outputs, labels) == pytest.approx(3 / 6)
    assert exact_match(outputs, labels) == 0.0


def test_top1_and_agreement():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)
    assert top1([[logits]], [np.array([1, 0, 0])]) == pytest.approx(2 / 3)
    flipped = logits[:, ::-1].copy()
    assert agreement([[logits]], [[logits]]) == 1.0
    assert agreement([[logits]], [[flipped]]) == 0.0


def test_every_metric_has_a_label():
    """The detection metrics are read from a DetectionRecord (measure.metrics.detection_scores), the rest from METRICS."""
    from optimizer.api.spec import DETECTION_METRICS

    assert set(METRICS) | set(DETECTION_METRICS) == set(METRIC_LABELS) == set(ACCURACY_METRICS)
    assert set(METRICS) == {"top1", "char-accuracy", "exact-match", "agreement"}


def test_evaluate_accuracy_dispatches_by_metric_name():
    fid = Fidelity(maxAbsDiff=0.0, cosine=1.0, argmaxAgreement=0.25)
    outputs, labels = [[_ctc_scores(["abd"])]], [pad_labels(["abc"])]
    assert accuracy("char-accuracy", outputs, labels, fid) == pytest.approx(2 / 3)
    assert accuracy("exact-match", outputs, labels, fid) == 0.0
    assert accuracy("agreement", outputs, labels, fid) == 0.25
    assert accuracy("char-accuracy", outputs, None, fid) == 0.25  # no labels: agreement with FP32
