"""Detectors through the whole pipeline: box mAP for every variant, against FP32 and against labels.

- A user's detector saved as ONNX (boxes + scores outputs), declared with model.detection and
  nothing from the zoo: box agreement without labels, mAP against a .npz of labelled boxes.
- zoo:shapes-detector (trained on first use, cached in $MLOPT_CACHE; minutes the first time):
  real mAP@0.5 of FP32 and of the best INT8 variant, the drop within the budget.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import QUICK_BENCHMARK, write_spec

pytestmark = pytest.mark.slow

SIDE = 64


def _user_detector_onnx(path) -> None:
    """A user's own detector, written here as any user would (no mlopt code): conv features, a 1×1
    head per 8×8 cell, the decode inside; outputs boxes [b, 64, 4] xyxy and scores [b, 64, 3]."""
    import torch
    from torch import nn

    class CellDetector(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                          nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                          nn.Conv2d(32, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
            self.head = nn.Conv2d(32, 4 + 3, 1)

        def forward(self, image):
            raw = self.head(self.features(image)).flatten(2).transpose(1, 2)  # [b, 64 cells, 7]
            cells = torch.arange(64, dtype=image.dtype)
            centre = torch.stack([cells % 8, cells // 8], dim=-1) * 8 + 4 + raw[..., 0:2].tanh() * 4
            size = raw[..., 2:4].sigmoid() * 32 + 4
            return torch.cat([centre - size / 2, centre + size / 2], dim=-1), raw[..., 4:].sigmoid()

    torch.manual_seed(0)
    model = CellDetector()
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, SIDE, SIDE))  # BatchNorm statistics
    torch.onnx.export(model.eval(), (torch.rand(1, 3, SIDE, SIDE),), str(path), input_names=["image"],
                      output_names=["boxes", "scores"], dynamo=False, opset_version=18,
                      dynamic_axes={"image": {0: "batch"}})


def _labelled_npz(path, samples: int = 32) -> None:
    """Images with labelled boxes in the documented layout: boxes [N, max_boxes, 4], labels [N, max_boxes], -1 pads."""
    rng = np.random.default_rng(0)
    boxes = np.zeros((samples, 3, 4), np.float32)
    labels = np.full((samples, 3), -1, np.int64)
    for index in range(samples):
        for row in range(rng.integers(1, 4)):
            x, y = rng.uniform(0, SIDE - 20, size=2)
            boxes[index, row] = [x, y, x + 16, y + 16]
            labels[index, row] = rng.integers(3)
    np.savez(path, image=rng.random((samples, 3, SIDE, SIDE), dtype=np.float32), boxes=boxes, labels=labels)


def _run(tmp_path, spec: dict):
    from optimizer.api.spec_loader import load_spec
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize

    results = optimize(load_spec(write_spec(tmp_path, spec)), tmp_path / "out", tmp_path, QuietReporter())
    return results, json.loads((tmp_path / "out" / "results.json").read_text())


def test_a_users_onnx_detector_gets_box_agreement_and_labelled_map(tmp_path):
    _user_detector_onnx(tmp_path / "detector.onnx")
    _labelled_npz(tmp_path / "boxes.npz")
    results, stored = _run(tmp_path, {
        "model": {"source": "detector.onnx", "inputs": [{"name": "image", "shape": [1, 3, SIDE, SIDE],
                                                          "dynamicAxes": {0: "batch"}}],
                  "detection": {"boxesOutput": 0, "scoresOutput": 1, "boxFormat": "xyxy", "scoreThreshold": 0.5}},
        "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32"}, {"name": "int8", "recipe": "ort-int8-static"}],
        "data": {"source": "boxes.npz"},
        "benchmark": QUICK_BENCHMARK,
        "acceptance": {"metric": "box-agreement", "maxAccuracyDrop": 0.5},
    })
    assert results.accuracyMetric == "box-agreement"
    baseline = results.baseline.detection
    assert baseline.vsFp32.map50 == pytest.approx(1.0) and baseline.detectionsPerImage > 0
    assert baseline.vsLabels is not None and 0.0 <= baseline.vsLabels.map50 < 1.0  # random weights vs real labels
    for variant in results.variants:
        assert variant.detection is not None and variant.accuracy == variant.detection.vsFp32.map50
        assert 0.0 <= variant.detection.vsFp32.map50_95 <= variant.detection.vsFp32.map50 <= 1.0
    assert results.variant("onnx-fp32").detection.vsFp32.map50 == pytest.approx(1.0)
    assert stored["variants"][1]["detection"]["vsFp32"]["map50"] == results.variant("int8").accuracy
    assert "box mAP50" in (tmp_path / "out" / "report.md").read_text()


def test_detection_that_does_not_fit_the_outputs_is_a_spec_error(tmp_path):
    from optimizer.api.errors import InputMismatchError

    _user_detector_onnx(tmp_path / "detector.onnx")
    with pytest.raises(InputMismatchError, match="boxesOutput"):
        _run(tmp_path, {
            "model": {"source": "detector.onnx", "inputs": [{"name": "image", "shape": [1, 3, SIDE, SIDE]}],
                      "detection": {"boxesOutput": 1, "scoresOutput": 0}},
            "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32"}],
            "benchmark": QUICK_BENCHMARK,
        })


def test_labelled_detector_keeps_real_map_after_int8(tmp_path):
    """zoo:shapes-detector on held-out labelled scenes: FP32 finds the shapes, and the best INT8 variant
    (picked within the default 1-point budget on mAP@0.5) loses at most that."""
    results, _ = _run(tmp_path, {
        "model": {"source": "zoo:shapes-detector"},
        "variants": [{"name": "onnx-fp32", "recipe": "onnx-fp32"}, {"name": "ort-int8-static", "recipe": "ort-int8-static"},
                     {"name": "torch-int8-static", "recipe": "torch-int8-static"}],
        "data": {"samples": 32},
        "benchmark": QUICK_BENCHMARK,
    })
    assert results.accuracyMetric == "map50"
    fp32 = results.baseline.accuracy
    assert fp32 == results.baseline.detection.vsLabels.map50 >= 0.6
    int8 = [v for v in results.variants if "int8" in v.recipe and v.status == "ok"]
    assert int8, [(v.name, v.status, v.error) for v in results.variants]
    best = max(int8, key=lambda v: v.accuracy)
    assert fp32 - best.accuracy <= 0.01
    assert best.detection.vsFp32.map50 > 0.8
    assert all(v.peakMemoryBytes is not None for v in [results.baseline, *int8])
