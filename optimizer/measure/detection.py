"""Detections from a detector's outputs, and COCO mAP over them.

A detector declared in the spec (`model.detection`) outputs boxes [batch, candidates, 4] and
per-class scores [batch, candidates, classes]. Its detections are the candidates' class scores
after per-class non-maximum suppression (torchvision's `batched_nms`), the highest
`maxDetections` per image. mAP is COCO's own evaluation (pycocotools' `COCOeval`: 101-point
interpolated AP per class, averaged over classes with ground truth; @0.5 and @0.5:0.95 over
IoU 0.50, 0.55 … 0.95), against either of two ground truths:

- FP32's detections at `scoreThreshold` ("box agreement", no labels): how far a variant's boxes
  moved from the model it was made from;
- labelled boxes from the data set.

The variant's own detections are scored down to SCORE_FLOOR, as COCO evaluation does: a box whose
score slid just under the threshold still counts as found, ranked low, rather than as missed.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from optimizer.api.spec import DetectionSpec

SCORE_FLOOR = 0.001  # COCO-style evaluation scores candidates down to here (Darknet/Ultralytics use 0.001-0.005)
PRE_NMS_CANDIDATES = 30_000  # per image, highest scores first: bounds NMS on a random-weight model


@dataclass(frozen=True)
class Detections:
    """One image's detections, xyxy."""

    boxes: np.ndarray  # [n, 4] float
    scores: np.ndarray  # [n]
    classes: np.ndarray  # [n] int

    def above(self, threshold: float) -> "Detections":
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep])


def to_xyxy(boxes: np.ndarray, box_format: str) -> np.ndarray:
    if box_format == "xyxy":
        return boxes
    from torchvision.ops import box_convert
    import torch

    return box_convert(torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)), box_format, "xyxy").numpy()


def _candidate_arrays(outputs: Sequence[np.ndarray], spec: DetectionSpec) -> tuple[np.ndarray, np.ndarray]:
    """(boxes [batch, n, 4], scores [batch, n, classes]) from one call's outputs, checked."""
    if max(spec.boxesOutput, spec.scoresOutput) >= len(outputs):
        raise DetectionOutputError(
            f"model.detection names output {max(spec.boxesOutput, spec.scoresOutput)}, but the model has "
            f"{len(outputs)} output(s); set boxesOutput and scoresOutput to the indices of its boxes and scores")
    boxes, scores = np.asarray(outputs[spec.boxesOutput]), np.asarray(outputs[spec.scoresOutput])
    if boxes.ndim == 4 and boxes.shape[2] == 1:  # [batch, n, 1, 4], as some exporters write it
        boxes = boxes[:, :, 0]
    if scores.ndim == 2:  # one class
        scores = scores[..., None]
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise DetectionOutputError(
            f"model.detection: output {spec.boxesOutput} has shape {list(boxes.shape)} and output "
            f"{spec.scoresOutput} {list(scores.shape)}; expected boxes [batch, candidates, 4] and scores "
            "[batch, candidates, classes] with the same batch and candidates; set model.detection.boxesOutput and "
            "scoresOutput to the indices of those outputs")
    return boxes, scores


class DetectionOutputError(ValueError):
    """The outputs model.detection names are not boxes and scores."""


def detect(outputs: Sequence[np.ndarray], spec: DetectionSpec, floor: float) -> list[Detections]:
    """Per image of one call: class scores ≥ floor, per-class NMS, the best spec.maxDetections."""
    import torch
    from torchvision.ops import batched_nms

    boxes, scores = _candidate_arrays(outputs, spec)
    boxes = to_xyxy(boxes.reshape(-1, 4), spec.boxFormat).reshape(boxes.shape)
    found = []
    for image_boxes, image_scores in zip(boxes, scores):
        candidate, klass = np.nonzero(image_scores >= floor)
        values = image_scores[candidate, klass]
        if len(values) > PRE_NMS_CANDIDATES:
            top = np.argpartition(-values, PRE_NMS_CANDIDATES)[:PRE_NMS_CANDIDATES]
            candidate, klass, values = candidate[top], klass[top], values[top]
        chosen = image_boxes[candidate].astype(np.float32)
        keep = batched_nms(torch.from_numpy(chosen), torch.from_numpy(values.astype(np.float32)),
                           torch.from_numpy(klass), spec.iouThreshold).numpy()[:spec.maxDetections]
        found.append(Detections(chosen[keep], values[keep].astype(np.float32), klass[keep].astype(np.int64)))
    return found


def detect_all(outputs: Sequence[Sequence[np.ndarray]], spec: DetectionSpec, floor: float) -> list[Detections]:
    """Every image of every evaluation item, in order."""
    return [image for item in outputs for image in detect(item, spec, floor)]


def labelled(boxes: Sequence[np.ndarray], classes: Sequence[np.ndarray], box_format: str) -> list[Detections]:
    """Labelled boxes per image (one array per item: [batch, max_boxes, 4] and [batch, max_boxes],
    class -1 = padding) as ground-truth Detections."""
    truth = []
    for item_boxes, item_classes in zip(boxes, classes):
        for image_boxes, image_classes in zip(item_boxes, item_classes):
            real = image_classes >= 0
            truth.append(Detections(to_xyxy(np.asarray(image_boxes[real], dtype=np.float32), box_format),
                                    np.ones(int(real.sum()), np.float32), image_classes[real].astype(np.int64)))
    return truth


@dataclass(frozen=True)
class MeanAP:
    map50: float
    map50_95: float


def mean_average_precision(truth: Sequence[Detections], predicted: Sequence[Detections]) -> MeanAP:
    """COCO mAP@0.5 and mAP@0.5:0.95 (all areas, 100 detections per image) of `predicted` against
    `truth`, image by image. With no ground-truth box at all, 1.0 when nothing was predicted either
    and 0.0 otherwise (COCOeval would say -1)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} ground-truth images but {len(predicted)} predicted")
    if not any(len(t.classes) for t in truth):
        none = not any(len(p.classes) for p in predicted)
        return MeanAP(float(none), float(none))
    classes = sorted({int(c) for t in truth for c in t.classes} | {int(c) for p in predicted for c in p.classes})
    annotations, results = [], []
    for image, (t, p) in enumerate(zip(truth, predicted)):
        for box, klass in zip(t.boxes, t.classes):
            width, height = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": len(annotations) + 1, "image_id": image, "category_id": int(klass),
                                "bbox": [float(box[0]), float(box[1]), width, height], "area": width * height,
                                "iscrowd": 0})
        for box, klass, score in zip(p.boxes, p.classes, p.scores):
            results.append({"image_id": image, "category_id": int(klass), "score": float(score),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    if not results:
        return MeanAP(0.0, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and summary
        reference = COCO()
        reference.dataset = {"images": [{"id": i} for i in range(len(truth))], "annotations": annotations,
                             "categories": [{"id": c} for c in classes]}
        reference.createIndex()
        evaluation = COCOeval(reference, reference.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return MeanAP(map50=max(0.0, float(evaluation.stats[1])), map50_95=max(0.0, float(evaluation.stats[0])))
