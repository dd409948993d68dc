"""The YOLO decode, shared by the zoo's detectors: one head's raw grid → boxes and scores per candidate."""

from __future__ import annotations

import torch


def decode(x: torch.Tensor, anchors: torch.Tensor, stride: int, num_classes: int,
           scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, A·(5+C), H, W) → boxes (batch, A·H·W, 4) xyxy in input pixels, scores (batch, A·H·W, C).

    Centre = (sigmoid(t_xy)·scale − (scale − 1)/2 + cell) · stride (scale > 1 lets a centre reach
    past its cell, Darknet's scale_x_y); size = exp(t_wh) · anchor; score = sigmoid(objectness) ·
    sigmoid(class). `anchors` is (A, 2) in pixels."""
    batch, _, height, width = x.shape
    count = anchors.shape[0]
    x = x.view(batch, count, 5 + num_classes, height, width).permute(0, 1, 3, 4, 2)
    ys = torch.arange(height, dtype=x.dtype, device=x.device).view(1, 1, height, 1, 1)
    xs = torch.arange(width, dtype=x.dtype, device=x.device).view(1, 1, 1, width, 1)
    grid = torch.cat([xs.expand(1, 1, height, width, 1), ys.expand(1, 1, height, width, 1)], dim=-1)
    centre = (x[..., 0:2].sigmoid() * scale - 0.5 * (scale - 1) + grid) * stride
    size = x[..., 2:4].exp() * anchors.view(1, count, 1, 1, 2)
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1).reshape(batch, -1, 4)
    scores = (x[..., 4:5].sigmoid() * x[..., 5:].sigmoid()).reshape(batch, -1, num_classes)
    return boxes, scores
