"""OpenVINO as a second engine: IR variants timed and checked like every other variant."""

from __future__ import annotations

import sys

import pytest

from .conftest import write_spec
from .test_model_matrix import ARCHITECTURES, QUICK, save_model

OPENVINO_RECIPES = ["openvino-fp32", "openvino-default", "openvino-int8", "openvino-ort-qdq"]


def _run(tmp_path, recipes):
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.spec_loader import load_spec

    model = save_model(tmp_path, "conv-bn-relu", "state-dict")
    spec = write_spec(tmp_path, {"model": model, "variants": [{"name": r, "recipe": r} for r in recipes],
                                 "data": {"samples": 16}, "benchmark": {**QUICK, "scalingBatches": [1, 4]},
                                 "acceptance": {"maxAccuracyDrop": 0.5}})
    return optimize(load_spec(spec), tmp_path / "out", tmp_path, QuietReporter())


def test_every_openvino_recipe_builds_ir_that_is_measured_and_checked(tmp_path):
    results = _run(tmp_path, ["onnx-fp32", *OPENVINO_RECIPES])
    out = tmp_path / "out"
    for name in OPENVINO_RECIPES:
        variant = results.variant(name)
        assert variant.status in ("ok", "rejected"), (name, variant.error)
        assert variant.runtime == "openvino" and variant.provider.startswith("CPU (")
        xml, weights = out / variant.artifact, out / variant.artifactFiles[0]
        assert xml.suffix == ".xml" and weights.suffix == ".bin"
        assert variant.sizeBytes == xml.stat().st_size + weights.stat().st_size
        assert variant.latencyMs.mean > 0 and variant.fidelity is not None
    assert results.variant("openvino-fp32").fidelity.maxAbsDiff < 1e-4  # FP32 pinned: the same numbers
    assert results.variant("openvino-fp32").provider == "CPU (f32)"
    assert results.variant("openvino-int8").lineage.options["quantizer"].startswith("nncf.quantize")
    assert "## Quantization with OpenVINO" in (out / "report.md").read_text()


def test_without_openvino_installed_its_variants_are_skipped_not_crashed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the wheel were absent
    results = _run(tmp_path, ["onnx-fp32", "openvino-fp32"])
    skipped = results.variant("openvino-fp32")
    assert skipped.status == "skipped" and skipped.error.startswith("skipped (not installed): openvino")
    assert results.variant("onnx-fp32").status == "ok"
