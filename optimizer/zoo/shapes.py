"""Synthetic scenes of shapes with labelled boxes: the zoo's detection data set (`zoo:shapes`).

Each 128×128 RGB image has 1-4 filled circles, squares and triangles (16-56 pixels across, any
colour, at least 0.25 brighter or darker than a noisy background), placed so that no two overlap
by more than IoU 0.3. `render(..., size=320)` draws the same kind of scene at another side, with
the shapes scaled by size/128 (40-140 pixels at 320: zoo:yolov4's anchors, at all three strides).
Rendered with numpy (a mask per shape), seeded, so every machine makes the same scenes; the
training, calibration and evaluation scenes come from different seeds.

Labels follow the `.npz` layout for detectors: `boxes` [N, MAX_BOXES, 4] xyxy in pixels and
`labels` [N, MAX_BOXES] class ids, -1 where a row is padding.
"""

from __future__ import annotations

import numpy as np

SIZE = 128
CLASSES = ("circle", "square", "triangle")
MAX_BOXES = 4
SIDE = (16, 56)  # pixels across
SEEDS = {"train": 20261204, "calibration": 7, "evaluation": 11}


def _overlaps(box: np.ndarray, placed: list[np.ndarray], limit: float = 0.3) -> bool:
    for other in placed:
        width = min(box[2], other[2]) - max(box[0], other[0])
        height = min(box[3], other[3]) - max(box[1], other[1])
        if width > 0 and height > 0:
            inter = width * height
            union = (box[2] - box[0]) * (box[3] - box[1]) + (other[2] - other[0]) * (other[3] - other[1]) - inter
            if inter / union > limit:
                return True
    return False


def _mask(kind: int, box: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box
    if kind == 0:  # circle inscribed in the box
        cx, cy, radius = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2
    if kind == 1:
        return (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
    # An upright isosceles triangle filling the box: apex at the top centre.
    cx, height = (x1 + x2) / 2, max(y2 - y1, 1.0)
    half_width = (ys - y1) / height * (x2 - x1) / 2
    return (ys >= y1) & (ys < y2) & (np.abs(xs - cx) <= half_width)


def render(count: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [count, 3, size, size] float32 in [0, 1], boxes [count, MAX_BOXES, 4] xyxy in pixels,
    labels [count, MAX_BOXES]); the shapes scaled by size / SIZE."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    scale = size / SIZE
    images = np.empty((count, 3, size, size), np.float32)
    boxes = np.zeros((count, MAX_BOXES, 4), np.float32)
    labels = np.full((count, MAX_BOXES), -1, np.int64)
    for index in range(count):
        background = rng.uniform(0.1, 0.9, size=3).astype(np.float32)
        image = background[:, None, None] + rng.normal(0, 0.04, (3, size, size)).astype(np.float32)
        placed: list[np.ndarray] = []
        for _ in range(rng.integers(1, MAX_BOXES + 1)):
            for _attempt in range(10):
                side = rng.uniform(*SIDE) * scale
                x1, y1 = rng.uniform(0, size - side, size=2)
                box = np.array([x1, y1, x1 + side, y1 + side], np.float32)
                if not _overlaps(box, placed):
                    break
            else:
                continue
            kind = int(rng.integers(len(CLASSES)))
            brightness = background.mean() + rng.choice([-1, 1]) * rng.uniform(0.25, 0.5)
            colour = np.clip(rng.uniform(-0.15, 0.15, size=3) + brightness, 0, 1).astype(np.float32)
            mask = _mask(kind, box, ys, xs)
            image[:, mask] = colour[:, None]
            boxes[index, len(placed)], labels[index, len(placed)] = box, kind
            placed.append(box)
        images[index] = np.clip(image, 0, 1)
    return images, boxes, labels
