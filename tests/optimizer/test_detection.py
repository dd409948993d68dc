"""Detections and box mAP: NMS over a detector's outputs, COCO mAP against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from optimizer.api.spec import DetectionSpec
from optimizer.measure.detection import (DetectionOutputError, Detections, detect, labelled,
                                         mean_average_precision)


def truth(*boxes_and_classes) -> Detections:
    boxes = np.array([b for b, _ in boxes_and_classes], dtype=np.float32).reshape(-1, 4)
    classes = np.array([c for _, c in boxes_and_classes], dtype=np.int64)
    return Detections(boxes, np.ones(len(classes), np.float32), classes)


def predicted(*boxes_classes_scores) -> Detections:
    boxes = np.array([b for b, _, _ in boxes_classes_scores], dtype=np.float32).reshape(-1, 4)
    return Detections(boxes, np.array([s for _, _, s in boxes_classes_scores], np.float32),
                      np.array([c for _, c, _ in boxes_classes_scores], np.int64))


def test_the_same_boxes_score_one():
    reference = [truth(([10, 10, 50, 50], 0), ([60, 60, 90, 100], 3)), truth(([0, 0, 20, 30], 1))]
    same = [predicted(([10, 10, 50, 50], 0, 0.9), ([60, 60, 90, 100], 3, 0.8)), predicted(([0, 0, 20, 30], 1, 0.7))]
    result = mean_average_precision(reference, same)
    assert result.map50 == pytest.approx(1.0) and result.map50_95 == pytest.approx(1.0)


def test_a_box_at_iou_0_6_counts_at_three_of_the_ten_coco_thresholds():
    """IoU 0.6 matches at 0.50, 0.55 and 0.60 only: mAP@0.5 = 1, mAP@0.5:0.95 = 3/10."""
    # [0, 0, 100, 100] against [0, 0, 100, 60]: intersection 6000 / union 10000.
    result = mean_average_precision([truth(([0, 0, 100, 100], 0))], [predicted(([0, 0, 100, 60], 0, 0.9))])
    assert result.map50 == pytest.approx(1.0)
    assert result.map50_95 == pytest.approx(0.3)


def test_half_the_boxes_found_is_coco_101_point_ap():
    """Recall 0.5 at precision 1: 51 of COCO's 101 recall points have precision 1, so AP = 51/101."""
    reference = [truth(([0, 0, 10, 10], 0), ([50, 50, 60, 60], 0))]
    result = mean_average_precision(reference, [predicted(([0, 0, 10, 10], 0, 0.9))])
    assert result.map50 == pytest.approx(51 / 101)


def test_a_wrong_class_is_a_miss_and_classes_are_averaged():
    reference = [truth(([0, 0, 10, 10], 0), ([50, 50, 60, 60], 1))]
    result = mean_average_precision(reference, [predicted(([0, 0, 10, 10], 0, 0.9), ([50, 50, 60, 60], 2, 0.9))])
    assert result.map50 == pytest.approx(0.5)  # class 0: AP 1, class 1: AP 0; class 2 has no ground truth


def test_low_ranked_false_positives_do_not_lower_ap_but_high_ranked_ones_do():
    reference = [truth(([0, 0, 10, 10], 0))]
    after = mean_average_precision(reference, [predicted(([0, 0, 10, 10], 0, 0.9), ([70, 70, 80, 80], 0, 0.1))])
    before = mean_average_precision(reference, [predicted(([0, 0, 10, 10], 0, 0.1), ([70, 70, 80, 80], 0, 0.9))])
    assert after.map50 == pytest.approx(1.0)
    assert before.map50 == pytest.approx(0.5, abs=0.01)


def test_no_reference_boxes():
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    assert mean_average_precision([empty], [empty]).map50 == 1.0
    assert mean_average_precision([empty], [predicted(([0, 0, 1, 1], 0, 0.5))]).map50 == 0.0


def test_nms_keeps_the_best_box_per_class_and_overlapping_boxes_of_other_classes():
    boxes = np.array([[[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [40, 40, 50, 50]]], np.float32)
    scores = np.zeros((1, 4, 3), np.float32)
    scores[0, 0, 0], scores[0, 1, 0], scores[0, 2, 1], scores[0, 3, 2] = 0.9, 0.8, 0.7, 0.1
    (found,) = detect([boxes, scores], DetectionSpec(scoreThreshold=0.25), floor=0.25)
    assert sorted(zip(found.classes.tolist(), (round(float(v), 2) for v in found.scores))) == [(0, 0.9), (1, 0.7)]
    (low,) = detect([boxes, scores], DetectionSpec(), floor=0.05)
    assert len(low.classes) == 3


def test_box_formats_and_layouts_are_read_as_declared():
    centre = np.array([[[[5, 5, 10, 10]]]], np.float32)  # [batch, n, 1, 4], cxcywh
    (found,) = detect([np.ones((1, 1), np.float32), centre],
                      DetectionSpec(boxesOutput=1, scoresOutput=0, boxFormat="cxcywh"), floor=0.5)
    np.testing.assert_allclose(found.boxes, [[0, 0, 10, 10]])
    (found,) = labelled([np.array([[[2, 3, 4, 5], [0, 0, 0, 0]]], np.float32)], [np.array([[7, -1]])], "xywh")
    np.testing.assert_allclose(found.boxes, [[2, 3, 6, 8]])
    assert found.classes.tolist() == [7]


def test_outputs_that_are_not_boxes_and_scores_are_named():
    with pytest.raises(DetectionOutputError, match="output 0 has shape"):
        detect([np.zeros((1, 10)), np.zeros((1, 10, 3))], DetectionSpec(), floor=0.1)
    with pytest.raises(DetectionOutputError, match="has 1 output"):
        detect([np.zeros((1, 10, 4))], DetectionSpec(), floor=0.1)


def test_auto_picks_box_metrics_for_a_detector_and_says_what_is_missing():
    from optimizer.steps.select import MetricError, resolve_metric

    assert resolve_metric("auto", "agreement", False, "random", detector=True) == "box-agreement"
    assert resolve_metric("auto", "map50", True, "zoo:shapes", sequence_labels=True, detector=True,
                          box_labels=True) == "map50"
    assert resolve_metric("auto", "agreement", False, "random") == "agreement"  # not a detector: as before
    with pytest.raises(MetricError, match="'boxes'"):
        resolve_metric("map50", "agreement", False, "random", detector=True)
    with pytest.raises(MetricError, match="model.detection"):
        resolve_metric("box-agreement", "agreement", False, "random")
    with pytest.raises(MetricError, match="map50 or map50-95"):
        resolve_metric("top1", "agreement", True, "x.npz", sequence_labels=True, detector=True, box_labels=True)


def test_a_detection_spec_names_two_different_outputs():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="two different outputs"):
        DetectionSpec(boxesOutput=1, scoresOutput=1)


def test_npz_boxes_must_sit_beside_padded_labels(tmp_path):
    from optimizer.api.spec import InputSpec
    from optimizer.steps.data import DataError, load_dataset

    inputs = [InputSpec(name="image", shape=[1, 3, 8, 8])]
    images = np.zeros((4, 3, 8, 8), np.float32)
    np.savez(tmp_path / "good.npz", image=images, boxes=np.zeros((4, 2, 4), np.float32),
             labels=np.array([[0, -1], [1, 2], [0, -1], [2, -1]]))
    dataset = load_dataset("good.npz", 4, inputs, tmp_path)
    assert [b.shape for b in dataset.boxes] == [(1, 2, 4), (1, 2, 4)] and dataset.labels[0].shape == (1, 2)
    np.savez(tmp_path / "bad.npz", image=images, boxes=np.zeros((4, 4), np.float32), labels=np.zeros((4, 2), np.int64))
    with pytest.raises(DataError, match=r"'boxes' \[samples, max_boxes, 4\]"):
        load_dataset("bad.npz", 4, inputs, tmp_path)
