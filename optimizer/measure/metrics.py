"""Accuracy metrics, one place: each is "higher is better", so an accuracy budget reads the same
for all of them (a drop of 0.01 is one point of top-1, of 1 − CER or of exact match).

`outputs` is one list per evaluation item of the model's numpy outputs; `labels` is one int64
array per item. Classification labels are [batch]; text labels are [batch, max_length] class ids
padded with -1, scored against CTC-greedy decoding of the FIRST output, (time, batch, classes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from optimizer.zoo.textlines import decode_greedy, label_texts

Outputs = Sequence[Sequence[np.ndarray]]
Labels = Sequence[np.ndarray]


def top1(outputs: Outputs, labels: Labels) -> float:
    correct = total = 0
    for item_outputs, item_labels in zip(outputs, labels):
        predicted = item_outputs[0].argmax(axis=-1).reshape(-1)
        correct += int((predicted == np.asarray(item_labels).reshape(-1)).sum())
        total += predicted.size
    return correct / max(total, 1)


def edit_distance(reference: str, hypothesis: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1); one DP row."""
    row = list(range(len(hypothesis) + 1))
    for i, ref_char in enumerate(reference, start=1):
        diagonal, row[0] = row[0], i
        for j, hyp_char in enumerate(hypothesis, start=1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ref_char != hyp_char))
    return row[-1]


def _text_pairs(outputs: Outputs, labels: Labels) -> list[tuple[str, str]]:
    pairs = []
    for item_outputs, item_labels in zip(outputs, labels):
        pairs += zip(label_texts(item_labels), decode_greedy(item_outputs[0]))
    return pairs


def cer(outputs: Outputs, labels: Labels) -> float:
    """Character error rate: total edit distance / total reference characters over the set."""
    pairs = _text_pairs(outputs, labels)
    errors = sum(edit_distance(reference, hypothesis) for reference, hypothesis in pairs)
    return errors / max(sum(len(reference) for reference, _ in pairs), 1)


def char_accuracy(outputs: Outputs, labels: Labels) -> float:
    """1 − CER (can go below 0 when the model inserts many characters)."""
    return 1.0 - cer(outputs, labels)


def exact_match(outputs: Outputs, labels: Labels) -> float:
    """The share of lines decoded exactly right."""
    pairs = _text_pairs(outputs, labels)
    return sum(reference == hypothesis for reference, hypothesis in pairs) / max(len(pairs), 1)


def agreement(reference: Outputs, candidate: Outputs) -> float:
    """Argmax agreement (last axis) of the first output with the reference model's outputs."""
    agree = total = 0
    for ref_outputs, cand_outputs in zip(reference, candidate):
        same = ref_outputs[0].argmax(axis=-1) == cand_outputs[0].argmax(axis=-1)
        agree += int(same.sum())
        total += same.size
    return agree / max(total, 1)


# The metrics by the names zoo entries and `acceptance.metric` use (optimizer/api/spec.py
# ACCURACY_METRICS; their labels are in optimizer/api/units.py). "agreement" needs the FP32
# reference rather than labels: evaluate.accuracy answers it from the fidelity it computed. The
# detection metrics (box-agreement, map50, map50-95) need the model's detection spec and labelled
# boxes: optimizer/measure/detection.py and `detection_scores` below.
METRICS: dict[str, Callable[[Outputs, Labels], float]] = {
    "top1": top1,
    "char-accuracy": char_accuracy,
    "exact-match": exact_match,
    "agreement": agreement,
}


def detection_scores(reference: Outputs, candidate: Outputs, detection, boxes: Labels | None = None,
                     labels: Labels | None = None):
    """A detector variant's DetectionRecord: mAP of its detections against FP32's (at the spec's
    scoreThreshold) and, given labelled `boxes` and their class `labels`, against those."""
    from optimizer.api.results import BoxScores, DetectionRecord
    from optimizer.measure.detection import SCORE_FLOOR, detect_all, labelled, mean_average_precision

    truth = [image.above(detection.scoreThreshold) for image in detect_all(reference, detection, detection.scoreThreshold)]
    found = detect_all(candidate, detection, SCORE_FLOOR)
    versus_fp32 = mean_average_precision(truth, found)
    record = DetectionRecord(vsFp32=BoxScores(map50=versus_fp32.map50, map50_95=versus_fp32.map50_95),
                             detectionsPerImage=sum(len(f.above(detection.scoreThreshold).classes) for f in found)
                             / max(len(found), 1))
    if boxes is not None and labels is not None:
        versus_labels = mean_average_precision(labelled(boxes, labels, detection.boxFormat), found)
        record.vsLabels = BoxScores(map50=versus_labels.map50, map50_95=versus_labels.map50_95)
    return record


def detection_accuracy(metric: str, record) -> float:
    """The run's detection metric, read from a DetectionRecord."""
    if metric == "box-agreement":
        return record.vsFp32.map50
    return record.vsLabels.map50 if metric == "map50" else record.vsLabels.map50_95
