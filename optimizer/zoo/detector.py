"""A small YOLO-style detector ("yolo-tiny"-like): zoo:detector, and zoo:shapes-detector trained.

Conv+BatchNorm+LeakyReLU(0.1) blocks, four stride-2 convolutions (stride 16 overall), a 3×3/1×1
neck and a 1×1 head with 3 anchors × (box 4 + objectness 1 + classes) per grid cell. zoo:detector
returns that raw head output, as YOLO decodes it afterwards; with `decode=True` (zoo:shapes-detector)
the decode is inside and the outputs are boxes and scores. No residuals or routes: plain,
FX-traceable, a few MB.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from optimizer.zoo.weights import calibrate_batchnorm, seeded
from optimizer.zoo.yolo_decode import decode as yolo_decode

NUM_CLASSES = 20  # Pascal VOC-sized label set
ANCHORS = 3
SIZE = 128
SEED = 20261128
STRIDE = 16

# (in, out, kernel, stride); four stride-2 blocks take 128×128 to an 8×8 grid.
_BLOCKS = [(3, 16, 3, 1), (16, 32, 3, 2), (32, 64, 3, 2), (64, 128, 3, 2), (128, 256, 3, 2),
           (256, 384, 3, 1), (384, 192, 1, 1)]


class ConvBlock(nn.Sequential):
    """conv, bn, act as named children so FX fusion finds conv-bn (LeakyReLU stays separate)."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int) -> None:
        super().__init__(OrderedDict(
            conv=nn.Conv2d(inputs, outputs, kernel, stride=stride, padding=kernel // 2, bias=False),
            bn=nn.BatchNorm2d(outputs),
            act=nn.LeakyReLU(0.1),
        ))


class TinyDetector(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, anchors: tuple[tuple[int, int], ...] | None = None) -> None:
        """`anchors` (3 × (width, height) pixels) turns the decode on: outputs boxes and scores."""
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(*(ConvBlock(*block) for block in _BLOCKS))
        self.head = nn.Conv2d(_BLOCKS[-1][1], ANCHORS * (5 + num_classes), 1)
        self.decode = anchors is not None
        if anchors is not None:
            self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32), persistent=False)

    def forward(self, image: torch.Tensor):
        raw = self.head(self.features(image))  # (batch, anchors*(5+classes), H/16, W/16)
        if not self.decode:
            return raw
        return yolo_decode(raw, self.anchors, STRIDE, self.num_classes)


def build() -> TinyDetector:
    with seeded(SEED):
        model = TinyDetector()
        calibrate_batchnorm(model, lambda: torch.rand(4, 3, SIZE, SIZE), steps=2)
    return model.eval()
