"""The model zoo: ready-made models for `model.source: zoo:<name>` (listed by `mlopt models`).

Each model lives in its own module, imported only when built, so listing the zoo (and validating
specs) never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from optimizer.api.spec import DetectionSpec, InputSpec

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ZooModel:
    name: str
    summary: str  # one line for `mlopt models`
    build: Callable[[], "torch.nn.Module"]  # eval-mode module with weights ready
    inputs: tuple[InputSpec, ...]  # with dynamicAxes where the model supports them
    data: str  # default data.source when the spec sets none: "random" or "zoo:<dataset>"
    metric: str  # a name in optimizer/measure/metrics.py: "top1"/"char-accuracy" (the data has labels) or "agreement"
    detection: DetectionSpec | None = None  # a detector: which outputs are boxes and scores (model.detection)
    samples: int | None = None  # data.samples when the spec sets none (a large model's default run stays short)


def _lazy_build(module: str) -> Callable[[], "torch.nn.Module"]:
    def build() -> "torch.nn.Module":
        return importlib.import_module(f"optimizer.zoo.{module}").build()

    build.__qualname__ = f"build_{module}"
    return build


_MODELS = [
    ZooModel(
        name="crnn",
        summary="the research note's CRNN text recognizer: 7 conv-bn-relu + 2 bidirectional LSTMs, "
        "31 MB, random weights",
        build=_lazy_build("crnn"),
        inputs=(InputSpec(name="image", shape=[1, 1, 32, 100], dtype="float32",
                          dynamicAxes={0: "batch", 3: "width"}),),
        data="random",
        metric="agreement",
    ),
    ZooModel(
        name="detector",
        summary="a small YOLO-style detector: conv-bn-leaky blocks, stride 16, 3 anchors × 20 classes, "
        "5 MB, random weights",
        build=_lazy_build("detector"),
        inputs=(InputSpec(name="image", shape=[1, 3, 128, 128], dtype="float32", dynamicAxes={0: "batch"}),),
        data="random",
        metric="agreement",
    ),
    ZooModel(
        name="yolov4",
        summary="the research note's YOLOv4: CSPDarknet53 (Mish) + SPP + PANet + 3 YOLO heads, 80 classes, "
        "64.4 M parameters, 257 MB, decode inside (boxes + scores), random weights; 320×320 (608 by spec)",
        build=_lazy_build("yolov4"),
        # 320, not the paper's 416/608: one FP32 inference is ~0.6 of 416's and ~0.28 of 608's work,
        # which keeps a whole default run (export, calibration, every variant timed) within minutes on 2 cores.
        inputs=(InputSpec(name="image", shape=[1, 3, 320, 320], dtype="float32", dynamicAxes={0: "batch"}),),
        data="random",
        metric="box-agreement",
        detection=DetectionSpec(),  # outputs (boxes xyxy, scores); Darknet's thresholds 0.25 / 0.45
        samples=16,  # 8 calibration + 8 evaluation images: each costs ~1 s per variant at 320×320
    ),
    ZooModel(
        name="shapes-detector",
        summary="zoo:detector's architecture with its decode inside, trained on synthetic scenes of circles, squares "
        "and triangles; trained on first use (minutes), scored by box mAP@0.5 on labelled boxes",
        build=_lazy_build("shapes_detector"),
        inputs=(InputSpec(name="image", shape=[1, 3, 128, 128], dtype="float32", dynamicAxes={0: "batch"}),),
        data="zoo:shapes",
        metric="map50",
        detection=DetectionSpec(),
    ),
    ZooModel(
        name="textlstm",
        summary="an LSTM text classifier: embedding 1000×64, LSTM 128, 4 classes, random weights",
        build=_lazy_build("textlstm"),
        inputs=(InputSpec(name="tokens", shape=[1, 32], dtype="int64",
                          dynamicAxes={0: "batch", 1: "sequence"}, valueRange=[0, 999]),),
        data="random",
        metric="agreement",
    ),
    ZooModel(
        name="digits",
        summary="a small CNN for scikit-learn's 8×8 digits, trained on first use (seconds), "
        "≥95% top-1",
        build=_lazy_build("digits"),
        inputs=(InputSpec(name="image", shape=[1, 1, 8, 8], dtype="float32", dynamicAxes={0: "batch"}),),
        data="zoo:digits",
        metric="top1",
    ),
    ZooModel(
        name="crnn-ocr",
        summary="the research note's CRNN (same architecture as zoo:crnn) trained with CTC on synthetic "
        "text lines; trained on first use (~25 min on 2 cores), scored by 1 − CER",
        build=_lazy_build("crnn_ocr"),
        inputs=(InputSpec(name="image", shape=[1, 1, 32, 100], dtype="float32",
                          dynamicAxes={0: "batch", 3: "width"}),),
        data="zoo:textlines",
        metric="char-accuracy",
    ),
]

ZOO: dict[str, ZooModel] = {model.name: model for model in _MODELS}


def get_zoo_model(name: str) -> ZooModel:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"zoo:{name} is not in the model zoo; available: "
                       + ", ".join(f"zoo:{known}" for known in ZOO)) from None
