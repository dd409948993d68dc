"""OpenVINO as a second engine: IR variants timed and checked like every other variant."""

from __future__ import annotations

import sys

import pytest

from optimizer.measure.hardware import VNNI_CLASSES

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
    # OpenVINO's default precision is saved as ov.save_model saves by default: FP16 weights, half the weights file
    fp32_bin, default_bin = (out / results.variant(n).artifactFiles[0] for n in ("openvino-fp32", "openvino-default"))
    assert default_bin.stat().st_size < 0.6 * fp32_bin.stat().st_size
    assert results.variant("openvino-default").lineage.options["weights"] == "fp16"
    assert results.variant("openvino-int8").lineage.options["quantizer"].startswith("nncf.quantize")
    assert "## Quantization with OpenVINO" in (out / "report.md").read_text()


def test_without_openvino_installed_its_variants_are_skipped_not_crashed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the wheel were absent
    results = _run(tmp_path, ["onnx-fp32", "openvino-fp32"])
    skipped = results.variant("openvino-fp32")
    assert skipped.status == "skipped" and skipped.error.startswith("skipped (not installed): openvino")
    assert results.variant("onnx-fp32").status == "ok"


BUDGET = 0.1  # acceptance.maxAccuracyDrop of the Outlier runs


def _outlier_run(tmp_path, data: dict, profile: str = "auto"):
    """openvino-int8 on the Outlier model, which plain 8-bit quantization ruins (conftest)."""
    from optimizer.console import QuietReporter
    from optimizer.pipeline import optimize
    from optimizer.api.spec_loader import load_spec

    weights = save_user_model(tmp_path, "Outlier")
    spec = write_spec(tmp_path, {
        "model": {"source": weights.name, "entrypoint": "user_models:Outlier", "inputs": OUTLIER_INPUTS},
        "variants": [{"name": "openvino-int8", "recipe": "openvino-int8"}], "data": data,
        "benchmark": {**QUICK_BENCHMARK, "profile": profile}, "acceptance": {"maxAccuracyDrop": BUDGET}})
    return optimize(load_spec(spec), tmp_path / "out", tmp_path, QuietReporter())


def _labelled_outlier_data(tmp_path):
    """Labels are the FP32 model's own classes, so FP32 scores 100% top-1 and any drop is quantization's.
    Returns the inputs: the first half is the labelled calibration split, the second the held-out one."""
    import numpy as np
    import torch

    model = load_user_model(tmp_path, "Outlier", "outlier_labels")
    inputs = np.random.default_rng(0).uniform(0, 1, size=(128, 16)).astype(np.float32)
    with torch.no_grad():
        labels = model.eval()(torch.from_numpy(inputs)).argmax(-1).numpy()
    np.savez(tmp_path / "labelled.npz", x=inputs, labels=labels)
    return inputs


def _other_int8_class() -> str:
    """The profile whose INT8 sums differ from this CPU's: 16-bit (avx2) on a VNNI CPU, 32-bit elsewhere."""
    from optimizer.measure.environment import cpu_info
    from optimizer.measure.hardware import isa_class

    return "avx2" if isa_class(cpu_info()[1]) in VNNI_CLASSES else "avx512-vnni"


def _spy_on_accuracy_control(monkeypatch) -> dict:
    """What mlopt hands NNCF (the real call still runs): the items of both splits and the keyword options."""
    import nncf

    seen, real = {}, nncf.quantize_with_accuracy_control

    def spy(model, calibration, validation, validation_fn, **options):
        seen.update(options, calibration=[item["x"].tobytes() for item in calibration.get_inference_data()],
                    validation=[feed["x"].tobytes() for feed, _ in validation.get_data()])
        return real(model, calibration, validation, validation_fn, **options)

    monkeypatch.setattr(nncf, "quantize_with_accuracy_control", spy)
    return seen


@pytest.mark.parametrize("target", ["this-cpu", "other-int8-class"])
def test_openvino_int8_controls_accuracy_when_the_data_has_labels(tmp_path, monkeypatch, target):
    """The promise on every CPU class: with labels, the kept variant is within budget on held-out data.

    Run for this CPU's class and for the one whose INT8 sums differ (avx2's saturate in 16 bits, VNNI's
    do not), so both overflow-fix settings are checked wherever the test runs; accuracy is always
    measured on this machine's kernels."""
    seen = _spy_on_accuracy_control(monkeypatch)
    inputs = _labelled_outlier_data(tmp_path)
    results = _outlier_run(tmp_path, {"source": "labelled.npz", "samples": 64},
                           "auto" if target == "this-cpu" else _other_int8_class())
    controlled, hardware = results.variant("openvino-int8"), results.environment.hardware
    options = controlled.lineage.options
    assert options["quantizer"] == "nncf.quantize_with_accuracy_control" and options["validationMetric"] == "top1"
    assert any(note.startswith("NNCF mode: accuracy control, top1") for note in controlled.notes), controlled.notes

    # NNCF validates on labelled calibration items it did not calibrate on, and never sees a held-out one.
    calibration, validation = set(seen["calibration"]), set(seen["validation"])
    labelled_split = {row.reshape(1, -1).tobytes() for row in inputs[:64]}
    assert calibration and validation, (len(calibration), len(validation))
    assert not calibration & validation, f"{len(calibration & validation)} validation item(s) also calibrate"
    assert not (calibration | validation) - labelled_split, "NNCF was given held-out items"
    assert (options["calibrationSamples"], options["validationSamples"]) == (len(calibration), len(validation))
    # NNCF aims below the budget (its validation split is small and noisy) ...
    assert seen["max_drop"] == options["maxDrop"] < BUDGET
    # ... with 7-bit weights where the target's u8×s8 sums are 16-bit, full 8-bit where VNNI sums in 32.
    expected_fix = "disable" if hardware["isa"] in VNNI_CLASSES else "enable"
    assert seen["advanced_quantization_parameters"].overflow_fix == options["overflowFix"] == expected_fix
    assert any(note.startswith(f"overflow fix: {expected_fix} ({hardware['isa']}") for note in controlled.notes)

    # The promise, on held-out items: kept, and within the budget of FP32's top-1 (100% by construction).
    assert results.baseline.accuracy == 1.0
    assert controlled.status == "ok", (controlled.accuracy, controlled.error, hardware)
    assert results.baseline.accuracy - controlled.accuracy <= BUDGET

    if target == "this-cpu":  # what accuracy control saved it from: plain PTQ on the same model
        (tmp_path / "plain").mkdir()
        plain = _outlier_run(tmp_path / "plain", {"source": "random", "samples": 128}).variant("openvino-int8")
        assert plain.lineage.options["quantizer"] == "nncf.quantize (post-training)"
        assert any(note.startswith("NNCF mode: plain post-training quantization (data.source random has no labels")
                   for note in plain.notes), plain.notes
        assert plain.status == "rejected" and plain.accuracy < 0.5
        assert plain.lineage.options["fakeQuantizeNodes"] > options["fakeQuantizeNodes"]
