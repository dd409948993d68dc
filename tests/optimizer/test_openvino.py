"""OpenVINO as a second engine: IR variants timed and checked like every other variant."""

from __future__ import annotations

import sys

import pytest

from .conftest import OUTLIER_INPUTS, QUICK_BENCHMARK, load_user_model, save_user_model, write_spec
from .test_model_matrix import QUICK, save_model

pytestmark = pytest.mark.slow  # every test here runs the whole pipeline

OPENVINO_RECIPES = ["openvino-fp32", "openvino-default", "openvino-int8", "openvino-ort-qdq"]


def _run(tmp_path, recipes):
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.api.spec_loader import load_spec

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


def _outlier_run(tmp_path, data: dict):
    """openvino-int8 on the Outlier model, which plain 8-bit quantization ruins (conftest)."""
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.api.spec_loader import load_spec

    weights = save_user_model(tmp_path, "Outlier")
    spec = write_spec(tmp_path, {
        "model": {"source": weights.name, "entrypoint": "user_models:Outlier", "inputs": OUTLIER_INPUTS},
        "variants": [{"name": "openvino-int8", "recipe": "openvino-int8"}], "data": data,
        "benchmark": QUICK_BENCHMARK, "acceptance": {"maxAccuracyDrop": 0.1}})
    return optimize(load_spec(spec), tmp_path / "out", tmp_path, QuietReporter()).variant("openvino-int8")


def _labelled_outlier_data(tmp_path) -> None:
    """Labels are the FP32 model's own classes, so FP32 scores 100% top-1 and any drop is quantization's."""
    import numpy as np
    import torch

    model = load_user_model(tmp_path, "Outlier", "outlier_labels")
    inputs = np.random.default_rng(0).uniform(0, 1, size=(128, 16)).astype(np.float32)
    with torch.no_grad():
        labels = model.eval()(torch.from_numpy(inputs)).argmax(-1).numpy()
    np.savez(tmp_path / "labelled.npz", x=inputs, labels=labels)


def test_openvino_int8_controls_accuracy_when_the_data_has_labels(tmp_path):
    _labelled_outlier_data(tmp_path)
    controlled = _outlier_run(tmp_path, {"source": "labelled.npz", "samples": 64})
    options = controlled.lineage.options
    assert options["quantizer"] == "nncf.quantize_with_accuracy_control"
    assert options["validationMetric"] == "top1" and options["maxDrop"] == 0.1 and options["validationSamples"] == 64
    assert any(note.startswith("NNCF mode: accuracy control, top1") for note in controlled.notes), controlled.notes
    # NNCF kept the ruined layers in FP32: held-out top-1 within the budget, where plain PTQ scores ~0.
    assert controlled.status == "ok" and controlled.accuracy >= 0.9, (controlled.accuracy, controlled.error)

    (tmp_path / "plain").mkdir()
    plain = _outlier_run(tmp_path / "plain", {"source": "random", "samples": 128})
    assert plain.lineage.options["quantizer"] == "nncf.quantize (post-training)"
    assert any(note.startswith("NNCF mode: plain post-training quantization (data.source random has no labels")
               for note in plain.notes), plain.notes
    assert plain.status == "rejected" and plain.accuracy < 0.5  # what accuracy control saved the first run from
    assert plain.lineage.options["fakeQuantizeNodes"] > options["fakeQuantizeNodes"]
