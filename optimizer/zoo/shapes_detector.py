"""zoo:detector's architecture trained on zoo:shapes (circles, squares, triangles), with its decode
inside: a detector with real labelled boxes, so box mAP before and after INT8 means something.

Training is a plain YOLOv3-style loss on freshly rendered scenes: each labelled box is assigned to
the grid cell of its centre and the anchor whose shape fits it best, which learns offset
(sigmoid, squared error), log-size (squared error), objectness (binary cross-entropy everywhere,
1 only at assigned cells) and class (binary cross-entropy at assigned cells). A few minutes on a
CPU the first time; later builds load `<cache>/zoo/shapes-detector-<VERSION>-<steps>.safetensors`.
`MLOPT_SHAPES_DETECTOR_STEPS` overrides the step count (the file name records it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from optimizer.artifacts.cache import cache_dir
from optimizer.engines.runners import torch_threads
from optimizer.zoo import shapes
from optimizer.zoo.detector import ANCHORS, STRIDE, TinyDetector
from optimizer.zoo.weights import cached_or_trained, seeded, warmup_cosine

VERSION = "v1"  # bump when the architecture, the scenes or the training change
SEED = 20261205
SHAPE_ANCHORS = ((20, 20), (32, 32), (48, 48))  # pixels: the scenes' shapes are 16-56 across
STEPS = 600  # measured: mAP@0.5 0.79 on held-out scenes after 400 steps; ~0.5-2 s a step on 2 busy cores
BATCH = 16
LEARNING_RATE = 2e-3
THREADS = 1  # small convolutions: a second thread costs more in hand-offs than it gains (as for digits)


def steps() -> int:
    return int(os.environ.get("MLOPT_SHAPES_DETECTOR_STEPS") or STEPS)


def cache_path(step_count: int | None = None) -> Path:
    return cache_dir("zoo") / f"shapes-detector-{VERSION}-{step_count or steps()}.safetensors"


def fresh() -> TinyDetector:
    return TinyDetector(num_classes=len(shapes.CLASSES), anchors=SHAPE_ANCHORS)


def _targets(boxes: np.ndarray, labels: np.ndarray, grid: int, stride: int = STRIDE,
             anchors: tuple[tuple[float, float], ...] = SHAPE_ANCHORS, head: int = 0,
             scale: float = 1.0, match: float | None = None, ignore: float | None = None) -> dict[str, torch.Tensor]:
    """Per (image, anchor, row, column): assigned mask, offset and log-size targets, class.

    Each box goes to the cell of its centre and the anchor that fits it best (IoU of the sizes) among
    all `anchors`; with several heads (YOLOv3/v4: 3 anchors each, `head` = which) only the boxes whose
    best anchor is this head's. `match` (Darknet's iou_thresh) also assigns every other anchor of the
    head whose size-IoU with the box exceeds it. `ignore` (YOLOv3's ignore_thresh) marks the unassigned
    (anchor, cell) pairs whose anchor box at the cell's centre overlaps a box by more than it: the loss
    does not push their objectness down. The offset target is the sigmoid's value that the decode
    (optimizer/zoo/yolo_decode.py, `scale` = Darknet's scale_x_y) turns into the box centre."""
    batch = len(boxes)
    assigned = torch.zeros(batch, ANCHORS, grid, grid, dtype=torch.bool)
    ignored = torch.zeros(batch, ANCHORS, grid, grid, dtype=torch.bool)
    offset = torch.zeros(batch, ANCHORS, grid, grid, 2)
    log_size = torch.zeros(batch, ANCHORS, grid, grid, 2)
    klass = torch.zeros(batch, ANCHORS, grid, grid, dtype=torch.long)
    anchors = np.array(anchors, np.float32)
    own = anchors[ANCHORS * head:ANCHORS * head + ANCHORS]
    for image in range(batch):
        for box, label in zip(boxes[image], labels[image]):
            if label < 0:
                continue
            width, height = box[2] - box[0], box[3] - box[1]
            if ignore is not None:
                ignored[image] |= torch.from_numpy(_anchor_overlap(box, own, grid, stride) > ignore)
            cx, cy = (box[0] + box[2]) / 2 / stride, (box[1] + box[3]) / 2 / stride
            column, row = min(int(cx), grid - 1), min(int(cy), grid - 1)
            overlap = np.minimum(anchors[:, 0], width) * np.minimum(anchors[:, 1], height)
            fit = overlap / (anchors[:, 0] * anchors[:, 1] + width * height - overlap)
            chosen = {int(np.argmax(fit)) - ANCHORS * head}
            if match is not None:
                chosen |= {index for index in range(ANCHORS) if fit[ANCHORS * head + index] > match}
            for best in sorted(index for index in chosen if 0 <= index < ANCHORS):
                anchor = anchors[ANCHORS * head + best]
                assigned[image, best, row, column] = True
                offset[image, best, row, column] = (torch.tensor([cx - column, cy - row]) + 0.5 * (scale - 1)) / scale
                log_size[image, best, row, column] = torch.tensor(np.log([width / anchor[0], height / anchor[1]]))
                klass[image, best, row, column] = int(label)
    targets = {"assigned": assigned, "offset": offset, "log_size": log_size, "class": klass}
    if ignore is not None:
        targets["ignored"] = ignored & ~assigned
    return targets


def _anchor_overlap(box: np.ndarray, anchors: np.ndarray, grid: int, stride: int) -> np.ndarray:
    """IoU of `box` with each anchor's box centred on each cell: [anchors, grid, grid]."""
    centres = (np.arange(grid, dtype=np.float32) + 0.5) * stride
    half = anchors[:, None, :] / 2  # [A, 1, 2]
    low_x, high_x = centres[None, :] - half[..., 0], centres[None, :] + half[..., 0]  # [A, grid] over columns
    low_y, high_y = centres[None, :] - half[..., 1], centres[None, :] + half[..., 1]  # over rows
    overlap_x = np.clip(np.minimum(high_x, box[2]) - np.maximum(low_x, box[0]), 0, None)
    overlap_y = np.clip(np.minimum(high_y, box[3]) - np.maximum(low_y, box[1]), 0, None)
    inter = overlap_y[:, :, None] * overlap_x[:, None, :]
    union = (anchors[:, 0] * anchors[:, 1])[:, None, None] + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return inter / union


def yolo_loss(raw: torch.Tensor, targets: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    batch, _, grid, _ = raw.shape
    x = raw.view(batch, ANCHORS, 5 + num_classes, grid, grid).permute(0, 1, 3, 4, 2)
    assigned = targets["assigned"]
    weight = (~targets["ignored"]).float() if "ignored" in targets else None
    objectness = F.binary_cross_entropy_with_logits(x[..., 4], assigned.float(), weight=weight, reduction="sum") / batch
    if not assigned.any():
        return objectness
    chosen = x[assigned]
    offset = F.mse_loss(chosen[:, 0:2].sigmoid(), targets["offset"][assigned], reduction="sum")
    size = F.mse_loss(chosen[:, 2:4], targets["log_size"][assigned], reduction="sum")
    classes = F.binary_cross_entropy_with_logits(
        chosen[:, 5:], F.one_hot(targets["class"][assigned], num_classes).float(), reduction="sum")
    return objectness + (5 * offset + size + classes) / batch


def train(step_count: int | None = None, log: Callable[[int, float], None] | None = None) -> TinyDetector:
    """AdamW on freshly rendered scenes (a new batch every step, seeded); the model in eval mode."""
    step_count = step_count or steps()
    with seeded(SEED), torch_threads(THREADS):
        model = fresh()
        model.decode = False  # train on the raw grid; the decode is for inference
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(step_count))
        running = None
        for step in range(1, step_count + 1):
            images, boxes, labels = shapes.render(BATCH, shapes.SEEDS["train"] + step)
            raw = model(torch.from_numpy(images))
            loss = yolo_loss(raw, _targets(boxes, labels, raw.shape[-1]), model.num_classes)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            schedule.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if log is not None and (step % 50 == 0 or step == step_count):
                log(step, running)
        model.decode = True
    return model.eval()


def build() -> TinyDetector:
    return cached_or_trained(f"shapes-detector ({steps()} steps; minutes on a CPU)", fresh, train, cache_path())
